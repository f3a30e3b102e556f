"""Weight files load exactly as strictly as torch's own `load_state_dict(strict=True)`: no stricter, no looser.

Old files (no BatchNorm `num_batches_tracked`, module versions 1 in `_metadata`, or no `_metadata` at all) load
as torch loads them; a missing weight, an unexpected key and a shape mismatch are refused with the key named,
and a refused file leaves the model as it was. Files that need arbitrary unpickling are refused unread.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from kdray.errors import CheckpointError
from kdray.models import build_model, load_backbone_weights, load_segmenter_weights, read_state_dict

ARCH, NUM_CLASSES, WIDTH = "pspnet_resnet18", 5, 0.125
COUNTER = "num_batches_tracked"


def fresh_model():
    return build_model(ARCH, NUM_CLASSES, width=WIDTH)


def source_state(module: torch.nn.Module, seed: int = 3) -> OrderedDict:
    """`module.state_dict()` with random values (so a load is visible), its `_metadata` kept."""
    state = module.state_dict()
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=g)
        else:
            state[key] = torch.full_like(value, 7)
    return state


def as_old_file(state: OrderedDict, version: int | None) -> OrderedDict:
    """The state without any `num_batches_tracked`, as PyTorch < 0.4.1 saved it: BatchNorm metadata version
    `version` (None: no `_metadata` attribute at all, as in a plain dict)."""
    old = OrderedDict((k, v) for k, v in state.items() if not k.endswith(COUNTER))
    if version is not None:
        old._metadata = with_version(state._metadata, version)
    return old


def with_version(metadata: OrderedDict, version: int) -> OrderedDict:
    """Every module's saved version set to `version` (only BatchNorm's matters: its current one is 2)."""
    return OrderedDict((k, {**v, "version": version} if "version" in v else dict(v)) for k, v in metadata.items())


def save(tmp_path: Path, obj, name: str = "weights.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def torch_accepts(state) -> bool:
    try:
        fresh_model().load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    return True


def kdray_accepts(path: Path) -> bool:
    try:
        load_segmenter_weights(fresh_model(), path)
    except CheckpointError:
        return False
    return True


@pytest.mark.parametrize("version", [1, None])
def test_old_file_without_num_batches_tracked_loads(tmp_path, version):
    state = source_state(fresh_model())
    path = save(tmp_path, as_old_file(state, version))
    model = fresh_model()
    load_segmenter_weights(model, path)
    loaded = model.state_dict()
    for key, value in state.items():
        if key.endswith(COUNTER):
            assert int(loaded[key]) == 0, key  # torch's fill: the model's own counter, untouched
        else:
            assert torch.equal(loaded[key], value), key


def test_old_backbone_file_nested_with_ddp_prefix_loads(tmp_path):
    """The `module.` prefix is removed from the keys and from `_metadata`'s module names alike."""
    state = as_old_file(source_state(fresh_model().pretrained), version=1)
    prefixed = OrderedDict((f"module.{k}", v) for k, v in state.items())
    prefixed._metadata = OrderedDict((f"module.{k}" if k else "module", v) for k, v in state._metadata.items())
    path = save(tmp_path, {"state_dict": prefixed, "epoch": 3})
    read = read_state_dict(path)
    assert read._metadata == state._metadata and list(read) == list(state)
    model = fresh_model()
    load_backbone_weights(model, path)
    loaded = model.pretrained.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_file_of_version_2_without_num_batches_tracked_is_refused_as_torch_refuses(tmp_path):
    state = as_old_file(source_state(fresh_model()), version=2)
    assert not torch_accepts(state)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): pretrained\.bn1\.num_batches_tracked"):
        load_segmenter_weights(fresh_model(), save(tmp_path, state))


def edit_drop_weight(state):
    del state["pretrained.layer1.0.conv1.weight"]


def edit_add_key(state):
    state["head.extra.weight"] = torch.zeros(2)


def edit_shape(state):
    state["pretrained.bn1.weight"] = torch.zeros(3)


def edit_counter_as_vector(state):
    state["pretrained.bn1.num_batches_tracked"] = torch.tensor([4])  # (1,) into 0-d: PyTorch 0.3's layout


def edit_counter_as_long_vector(state):
    state["pretrained.bn1.num_batches_tracked"] = torch.tensor([4, 5])


EDITS = [edit_drop_weight, edit_add_key, edit_shape, edit_counter_as_vector, edit_counter_as_long_vector]


@pytest.mark.parametrize("version", [1, 2, None])
@pytest.mark.parametrize("edit", [None, *EDITS], ids=lambda e: getattr(e, "__name__", str(e)))
@pytest.mark.parametrize("drop_counters", [False, True])
def test_kdray_accepts_exactly_what_torch_strict_accepts(tmp_path, version, edit, drop_counters):
    state = source_state(fresh_model())
    if drop_counters:
        state = as_old_file(state, version)
    elif version is None:
        state = OrderedDict(state)  # no _metadata
    else:
        state._metadata = with_version(state._metadata, version)
    if edit is not None:
        edit(state)
    assert kdray_accepts(save(tmp_path, state)) == torch_accepts(state)


def test_refusals_name_the_keys_and_both_shapes(tmp_path):
    state = as_old_file(source_state(fresh_model()), version=1)
    edit_drop_weight(state)
    edit_add_key(state)
    edit_shape(state)
    with pytest.raises(CheckpointError) as err:
        load_segmenter_weights(fresh_model(), save(tmp_path, state))
    message = str(err.value)
    assert "1 missing key(s): pretrained.layer1.0.conv1.weight;" in message
    assert "1 unexpected key(s): head.extra.weight;" in message
    assert "1 shape mismatch(es): pretrained.bn1.weight (file 3, model 8)" in message
    assert COUNTER not in message  # the counters torch fills are not reported


def test_refused_file_leaves_the_model_untouched(tmp_path):
    state = source_state(fresh_model())
    edit_shape(state)
    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_segmenter_weights(model, save(tmp_path, state))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_malformed_metadata_is_refused(tmp_path):
    state = source_state(fresh_model())
    state._metadata = ["not", "a", "mapping"]
    with pytest.raises(CheckpointError, match="malformed `_metadata`"):
        read_state_dict(save(tmp_path, state))


RAN = []


class _Payload:
    """Unpickling this runs `RAN.append`: what a weights file must never be able to do."""

    def __reduce__(self):
        return RAN.append, ("executed",)


def test_file_needing_arbitrary_unpickling_is_refused_unexecuted(tmp_path):
    state = dict(source_state(fresh_model()))
    state["payload"] = _Payload()
    path = tmp_path / "unsafe.pth"
    with path.open("wb") as f:
        pickle.dump(state, f, protocol=2)  # old-style (non-zip) torch file: the pickle alone
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        load_segmenter_weights(fresh_model(), path)
    torch.save({"state_dict": state}, path)  # zip format, the payload nested
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        read_state_dict(path)
    assert RAN == []


def test_unreadable_files_are_named_in_one_line(tmp_path):
    import numpy as np

    empty, text, extra = tmp_path / "empty.pt", tmp_path / "text.pt", tmp_path / "extra.pt"
    empty.write_bytes(b"")
    text.write_text("hello")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "best": np.float64(3.0)}, extra)
    for path, says in ((empty, "it is empty"), (text, "not a PyTorch weights file, or a damaged one"),
                       (extra, "holds objects besides tensors")):
        with pytest.raises(CheckpointError, match=says) as err:
            read_state_dict(path)
        assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
