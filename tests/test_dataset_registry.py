"""The dataset registry: the built-ins declare what the config rules used to list by name, and a dataset defined
in a plugin file outside the package is a `data.dataset` like a built-in one."""

import textwrap

import pytest
import torch

from kdray.config import job_from_dict, to_dict
from kdray.data import DATASETS, build_dataset, class_names, dataset_spec, raw_dataset, split_name
from kdray.data.cityscapes import LABEL_TO_TRAIN_ID
from kdray.errors import ConfigError

CLASSES = ("sky", "ground", "thing")


def plugin_source(name: str) -> str:
    return textwrap.dedent(f'''
        from dataclasses import dataclass

        import torch
        from torch.utils.data import Dataset
        from torchvision import tv_tensors

        from kdray.config.options import option
        from kdray.data import register_dataset


        @dataclass
        class Options:
            size: int = option(16, at_least=8)
            length: int = option(6, at_least=1)


        @register_dataset("{name}", class_names={CLASSES!r}, splits=("train", "val"), paper_splits=("train", "val"),
                          image_size=lambda o: (o.size, o.size), needs_root=False, options=Options,
                          build=lambda r: Stripes(r.split, r.options.size, 2 if r.role == "val" else r.options.length))
        class Stripes(Dataset):
            """Three horizontal bands, one per class; the image's red channel holds the item's index."""

            def __init__(self, split, size, length):
                self.split, self.size, self.length = split, size, length

            def __len__(self):
                return self.length

            def __getitem__(self, index):
                mask = (torch.arange(self.size) * 3 // self.size).view(-1, 1).expand(self.size, self.size)
                image = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
                image[0] = index
                return tv_tensors.Image(image), tv_tensors.Mask(mask.contiguous().long())
    ''')


@pytest.fixture
def plugin(tmp_path, request):
    """A plugin file registering a dataset with a name unique to the test; unregistered afterwards."""
    name = "stripes_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:40]
    path = tmp_path / "my_data.py"
    path.write_text(plugin_source(name))
    yield str(path), name
    DATASETS.pop(name, None)


def test_a_plugin_dataset_trains_and_evaluates_like_a_built_in(plugin):
    path, name = plugin
    job = job_from_dict({"plugins": [path], "data": {"dataset": name, "num_classes": 3, "crop": [16, 16],
                                                     name: {"size": 12}}})
    assert job.data.dataset == name and getattr(job.data, name).size == 12
    assert to_dict(job)["data"][name] == {"size": 12, "length": 6}
    assert (split_name(job.data, "train"), split_name(job.data, "val")) == ("train", "val")
    train, val = raw_dataset(job.data, "train"), raw_dataset(job.data, "val")
    assert (len(train), len(val)) == (6, 2)
    image, mask = train[4]
    assert image.shape == (3, 12, 12) and int(image[0, 0, 0]) == 4 and set(mask.unique().tolist()) == {0, 1, 2}
    image, mask = build_dataset(job.data, "train")[(0, 1)]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and mask.shape == (16, 16)
    assert class_names(job.data) == list(CLASSES)
    assert dataset_spec(name).dataset.__name__ == "Stripes"


@pytest.mark.parametrize(("changes", "fragments"), [
    ({"size": 4}, ["size: got 4", "must be >= 8"]),
    ({"length": 0}, ["length: got 0", ">= 1"]),
    ({"sise": 4}, ["sise: unknown key", "did you mean 'size'"]),
])
def test_a_plugin_dataset_options_are_checked(plugin, changes, fragments):
    path, name = plugin
    with pytest.raises(ConfigError) as err:
        job_from_dict({"plugins": [path], "data": {"dataset": name, "num_classes": 3, "crop": [16, 16],
                                                   name: changes}})
    for fragment in [f"data.{name}.", *fragments]:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_a_plugin_dataset_gets_the_data_rules_from_its_spec(plugin):
    path, name = plugin
    base = {"plugins": [path], "data": {"dataset": name, "num_classes": 3, "crop": [16, 16]}}
    with pytest.raises(ConfigError, match=rf"data.num_classes: got 4; the {name} dataset has 3 classes"):
        job_from_dict(base, ["data.num_classes=4"])
    with pytest.raises(ConfigError, match=r"data.crop: got \[40, 40\]; the .* images are at most 16x16, 32x32"):
        job_from_dict(base, ["data.crop=[40, 40]"])
    with pytest.raises(ConfigError, match=r"data.val_split: got 'test'; the .* splits are train, val"):
        job_from_dict(base, ["data.val_split=test"])


def test_an_unknown_dataset_gets_a_did_you_mean():
    with pytest.raises(ConfigError) as err:
        job_from_dict({"data": {"dataset": "citiscapes", "num_classes": 19, "root": "x"}})
    message = str(err.value)
    assert message.startswith("data.dataset: got 'citiscapes' (did you mean cityscapes?); registered: ")
    assert all(name in message for name in ("synthetic", "cityscapes", "voc", "camvid", "folder"))
    with pytest.raises(ConfigError, match="did you mean"):
        dataset_spec("vocc")


def test_the_built_in_specs_state_the_papers_facts():
    assert {"synthetic", "cityscapes", "voc", "camvid", "folder"} <= set(DATASETS)
    counts = {name: len(DATASETS[name].class_names) for name in ("cityscapes", "voc", "camvid", "synthetic")}
    assert counts == {"cityscapes": 19, "voc": 21, "camvid": 11, "synthetic": 8}
    assert DATASETS["folder"].class_names == "class_names"  # names come from data.folder.class_names
    sizes = {name: DATASETS[name].image_size for name in ("cityscapes", "camvid", "voc", "folder")}
    assert sizes == {"cityscapes": (1024, 2048), "camvid": (360, 480), "voc": (500, 500), "folder": None}
    assert DATASETS["synthetic"].largest_image(job_from_dict({}, ["data.synthetic.image_size=40"]).data.synthetic) \
        == (40, 40)
    paper = {name: spec.paper_splits for name, spec in DATASETS.items() if name in
             ("synthetic", "cityscapes", "voc", "camvid", "folder")}
    assert paper == {"synthetic": ("train", "val"), "cityscapes": ("train", "val"), "voc": ("train_aug", "val"),
                     "camvid": ("train", "test"), "folder": ("train", "val")}
    splits = {name: DATASETS[name].splits for name in ("synthetic", "cityscapes", "camvid", "voc", "folder")}
    assert splits == {"synthetic": ("train", "val"), "cityscapes": ("train", "val"),
                      "camvid": ("train", "val", "test", "trainval"), "voc": None, "folder": None}
    assert [n for n, s in DATASETS.items() if s.eval_batch_one] == ["ade20k", "voc"]
    assert [n for n, s in DATASETS.items() if not s.needs_root] == ["synthetic"]
    assert DATASETS["cityscapes"].label_map is LABEL_TO_TRAIN_ID and len(LABEL_TO_TRAIN_ID) == 19
    assert (DATASETS["cityscapes"].void, DATASETS["voc"].void, DATASETS["camvid"].void) == (255, 255, 11)
    assert DATASETS["synthetic"].smoke_overrides == {"data.synthetic.train_length": 64,
                                                     "data.synthetic.val_length": 16}


def test_registering_a_taken_name_is_refused():
    from kdray.data import register_dataset

    with pytest.raises(ConfigError, match="'voc' is taken by kdray.data.voc.VOCAug"):
        register_dataset("voc", class_names=("a", "b"), paper_splits=("train", "val"))(type("Other", (), {}))
    with pytest.raises(ConfigError, match="must name an option"):
        register_dataset("nameless", class_names="names", paper_splits=("train", "val"))
