"""ECG model configs (JSON, open_clip schema), installed as package data of open_clip_ecg."""
