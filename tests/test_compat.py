"""The adapter to upstream (open_clip_ecg.compat): every seam exists in the installed packages,
every rejected training flag is still open_clip_train's, the version check speaks clearly, and
swapping seams leaves upstream as it was."""
import warnings

import open_clip.factory
import open_clip.model
import open_clip_train.data
import open_clip_train.main
import open_clip_train.train
import pytest
import torch

import open_clip_ecg  # noqa: F401  (installs the text tower seams)
import open_clip_ecg.train as ecg_train
from open_clip_ecg import compat, text_towers
from open_clip_ecg.training import options as train_options, seams


@pytest.mark.parametrize("seam", compat.SEAMS, ids=lambda seam: seam.name)
def test_every_seam_exists_in_the_installed_packages(seam):
    seam.get()


def test_the_seams_cover_every_swap_the_training_run_makes():
    swapped = {compat.PARSE_ARGS, compat.CREATE_MODEL_AND_TRANSFORMS, compat.CREATE_LOSS, compat.MAIN_TORCH,
               compat.GET_DATASET_FN, compat.ZERO_SHOT_EVAL}
    assert swapped <= set(compat.SEAMS)
    assert len({seam.name for seam in compat.SEAMS}) == len(compat.SEAMS)


def test_every_rejected_flag_is_one_of_open_clip_trains_flags():
    defaults = vars(compat.TRAIN_PARAMS_PARSE_ARGS.get()([]))
    missing = sorted(set(train_options.REJECTED_FLAGS) - set(defaults))
    assert not missing, f"open_clip_train no longer has {missing}: update REJECTED_FLAGS"


def test_a_rejected_flag_renamed_upstream_fails_loudly(monkeypatch):
    monkeypatch.setitem(train_options.REJECTED_FLAGS, "imagenet_validation", "renamed upstream")
    args = compat.TRAIN_PARAMS_PARSE_ARGS.get()(["--model", "ECG-RN18-CLIPText"])
    with pytest.raises(compat.UpstreamChanged, match="--imagenet-validation, which open_clip_train"):
        train_options.check_open_clip_args(args)


def test_a_missing_seam_names_itself_the_installed_and_the_supported_version():
    seam = compat.Seam("open_clip_train.main", "create_loss_v2", "the multi-label SigLIP loss")
    with pytest.raises(compat.UpstreamChanged) as caught:
        seam.get()
    installed = compat.installed_version("open_clip_torch")
    assert str(caught.value) == (
        f"open_clip_ecg needs open_clip_train.main.create_loss_v2 (the multi-label SigLIP loss), which "
        f"open_clip_torch {installed} does not have; supported: open_clip_torch 3.3.x")
    with pytest.raises(compat.UpstreamChanged, match="cannot import"):
        compat.Seam("open_clip_train.tasks", "SigLIPTask", "x").get()


def test_version_check_accepts_3_3_and_warns_for_other_versions():
    assert compat.open_clip_version_problem("3.3.0") is None
    assert compat.open_clip_version_problem("3.3.12") is None
    message = compat.open_clip_version_problem("4.2.0.dev0")
    assert message.startswith("open_clip_ecg is tested with open_clip_torch 3.3.x, not 4.2.0.dev0")
    assert compat.open_clip_version_problem("3.4.0") is not None
    with pytest.warns(UserWarning, match="not 3.2.1"):
        compat.check_open_clip_version("3.2.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_open_clip_version(compat.installed_version("open_clip_torch"))


def test_swapped_replaces_for_the_block_and_restores_even_after_an_error():
    originals = [seam.get() for seam in (compat.CREATE_LOSS, compat.ZERO_SHOT_EVAL)]
    loss, zero_shot = object(), object()
    with pytest.raises(KeyError):
        with compat.swapped([(compat.CREATE_LOSS, loss), (compat.ZERO_SHOT_EVAL, zero_shot)]):
            assert open_clip_train.main.create_loss is loss
            assert open_clip_train.train.zero_shot_eval is zero_shot
            raise KeyError("inside the run")
    assert [open_clip_train.main.create_loss, open_clip_train.train.zero_shot_eval] == originals


def test_a_missing_seam_changes_nothing():
    original = open_clip_train.main.create_loss
    missing = compat.Seam("open_clip_train.main", "create_loss_v2", "x")
    with pytest.raises(compat.UpstreamChanged):
        with compat.swapped([(compat.CREATE_LOSS, object()), (missing, object())]):
            pass
    assert open_clip_train.main.create_loss is original


def test_the_training_seams_are_installed_for_one_run_and_upstream_is_untouched_after():
    modules = {"parse_args": open_clip_train.main, "create_model_and_transforms": open_clip_train.main,
               "create_loss": open_clip_train.main, "torch": open_clip_train.main,
               "get_dataset_fn": open_clip_train.data, "zero_shot_eval": open_clip_train.train}
    before = {name: getattr(module, name) for name, module in modules.items()}
    options = train_options.ecg_argument_parser().parse_args([])
    with seams.open_clip_seams(options, []):
        during = {name: getattr(module, name) for name, module in modules.items()}
        assert all(during[name] is not before[name] for name in modules)
        assert open_clip_train.train.zero_shot_eval is seams.ecg_zero_shot_eval
    assert {name: getattr(module, name) for name, module in modules.items()} == before
    assert open_clip_train.main.torch is torch


def test_mains_view_of_torch_replaces_save_and_ddp_only():
    def save(*args, **kwargs):
        pass

    view = compat.module_view(torch, {"save": save,
                                      "nn.parallel.DistributedDataParallel": seams.CPUCapableDistributedDataParallel})
    assert view.save is save and torch.save is not save
    assert view.nn.parallel.DistributedDataParallel is seams.CPUCapableDistributedDataParallel
    assert torch.nn.parallel.DistributedDataParallel is not seams.CPUCapableDistributedDataParallel
    assert view.manual_seed is torch.manual_seed and view.nn.SyncBatchNorm is torch.nn.SyncBatchNorm
    assert view.distributed.barrier is torch.distributed.barrier and view.cuda is torch.cuda
    with pytest.raises(compat.UpstreamChanged, match="torch.nn.parallel.DataParallelV2"):
        compat.module_view(torch, {"nn.parallel.DataParallelV2": save})


def test_text_tower_seams_are_installed_and_delegate_to_upstream():
    assert open_clip.model._build_text_tower is text_towers._build_text_tower
    assert open_clip.factory.HFTokenizer is text_towers._hf_tokenizer
    assert text_towers._upstream_build_text_tower is not text_towers._build_text_tower
    text_towers.install_text_tower_seams()  # idempotent
    assert open_clip.model._build_text_tower is text_towers._build_text_tower


def test_upstream_values_are_importable_from_compat_and_unknown_names_are_not():
    import wfdb.io._signal
    from timm.models._features import feature_take_indices

    assert compat.BYTES_PER_SAMPLE is wfdb.io._signal.BYTES_PER_SAMPLE
    assert compat.feature_take_indices is feature_take_indices
    assert compat.SharedEpoch is open_clip_train.data.SharedEpoch
    assert isinstance(compat.cpu_has_bf16(), bool)
    with pytest.raises(AttributeError):
        compat.no_such_name  # noqa: B018


def test_train_subcommand_protocol_passes_every_flag_through():
    """`open-clip-ecg train` declares no flags of its own: open_clip_train's and the --ecg-* ones reach
    train.main unparsed and in order (negative numbers and --flag=value forms included)."""
    from open_clip_ecg.cli import command_parser, parse_command_args

    parser = command_parser("train", ecg_train)
    flags = ["--model", "ECG-RN18-CLIPText", "--ecg-targets", "exact", "--lr=1e-3", "--ecg-init-logit-bias", "-4"]
    assert parse_command_args(parser, flags).forwarded_args == flags
    assert parse_command_args(parser, []).forwarded_args == []