"""The dataset registry: every dataset kdray can read, each declared once, on its own class.

A dataset is a file holding its options (if it has any) and its `Dataset` class:

    @dataclass
    class MyDataOptions:                          # the job's `data.my_data` section
        length: int = option(100, at_least=1)

    @register_dataset("my_data", class_names=("background", "thing"), splits=("train", "val"),
                      paper_splits=("train", "val"), options=MyDataOptions, needs_root=False,
                      build=lambda request: MyData(request.split, request.options.length))
    class MyData(torch.utils.data.Dataset):
        def __getitem__(self, index) -> tuple[tv_tensors.Image, tv_tensors.Mask]: ...

The contract:

- **name** is the value of `data.dataset` in a job and the key of the dataset's options (`data.my_data.length`);
  unique across built-ins and plugins.
- **class_names**: the names of class ids 0..K-1 in id order, or the name of the option that holds them (the
  folder dataset's `class_names`). `data.num_classes` must equal their count (unless `strict_class_count` is
  False), and each must stay a distinct MLflow metric name (`train/iou/<name>`).
- **splits**: the split names the dataset knows; None: any name that is not a path (a list file or folder name).
  **paper_splits**: the (train, evaluation) splits the papers use, taken when `data.train_split` /
  `data.val_split` are not set.
- **void**: the raw mask value that marks pixels counting nowhere, read as `data.ignore_index`; None: the files
  hold `data.ignore_index` itself (or nothing is ignored). **label_map**: raw id -> class id where the files do
  not hold class ids (Cityscapes' `labelIds`); ids it leaves out are ignored. Both are facts the loader
  applies; the spec states them so that they can be read without opening a file.
- **image_size**: (height, width) of the largest image the dataset serves, or a function of its options giving
  it; None: unbounded. A training crop larger than that times the largest scale is refused (mostly padding).
- **eval_batch_one**: the images differ in size, so evaluation batches hold one image
  (`data.eval_batch_size` must be 1).
- **needs_root**: the dataset reads files under `data.root`, which the job must then name.
- **options**: the dataclass of the `data.<name>` section (types checked by the loader, number ranges written
  once with `kdray.config.options.option`, rules tying options together in a `check(prefix)` method), or
  None. Only the selected dataset's options are checked.
- **build** makes the untransformed dataset of one split from a `DatasetRequest` (root, split, role, ignore
  value, how many masks to check now, options); its items are `(tv_tensors.Image uint8 (3, H, W),
  tv_tensors.Mask int64 (H, W))` with values 0..K-1 or the ignore value. Default: the class called as
  `cls(root, split, ignore_index, sample_check)`, the signature of the file loaders (`kdray.data.files`).
  File errors are `DataError`s naming the file.
- **smoke_overrides**: dotted-key overrides a `--smoke-test` sweep applies when the job reads this dataset
  (a short synthetic split), so that a smoke test stays seconds long.
- **palette**: the colour each class is drawn in (the predictions an evaluation renders, the report's
  qualitative figure): K (r, g, b) tuples of integers 0..255 in class-id order, K the number of class names
  (any length when the names come from an option: it is used when it has data.num_classes entries). None: a
  generated palette of well-separated colours (`default_palette`). Pixels of no class (the ignore value) are
  drawn black whatever the palette says.

A plugin file registers its datasets the same way (`plugins:` in a job); from then on `data.dataset: my_data`
and `data.my_data.*` work in jobs, overrides and search spaces.
"""

from __future__ import annotations

import colorsys
import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from kdray.config.options import check_options
from kdray.errors import ConfigError

__all__ = ["DATASETS", "DatasetRequest", "DatasetSpec", "dataset_spec", "default_palette", "register_dataset"]


@dataclass(frozen=True)
class DatasetRequest:
    """What a dataset's `build` gets: the split to read, in which role, and the job's data settings."""

    root: str | None  # data.root (absolute), None when the job names none
    split: str  # the split's name (data.<role>_split, else the paper's)
    role: str  # "train" or "val": which of the job's splits this is
    ignore_index: int  # data.ignore_index
    sample_check: int  # how many masks a file dataset reads now (first, middle, last, ...)
    options: Any  # the dataset's options (data.<name>), None when it has none


Build = Callable[[DatasetRequest], Dataset]
Palette = tuple[tuple[int, int, int], ...]  # one (r, g, b) per class id, each 0..255


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset (see the module docstring for each field's contract)."""

    name: str
    dataset: type[Dataset]
    class_names: tuple[str, ...] | str
    paper_splits: tuple[str, str]
    splits: tuple[str, ...] | None = None
    void: int | None = None
    label_map: Mapping[int, int] | None = None
    image_size: tuple[int, int] | Callable[[Any], tuple[int, int]] | None = None
    eval_batch_one: bool = False
    needs_root: bool = True
    strict_class_count: bool = True
    options: type | None = None
    build: Build | None = None
    smoke_overrides: Mapping[str, Any] = field(default_factory=dict)
    palette: Palette | None = None

    def options_of(self, data: Any) -> Any:
        """This dataset's options in the job's `data` section (None when it has none)."""
        return getattr(data, self.name) if self.options is not None else None

    def names(self, options: Any) -> tuple[str, ...]:
        """The class names in id order, from the spec or from the option that holds them (empty when unset)."""
        if isinstance(self.class_names, str):
            return tuple(getattr(options, self.class_names) or ())
        return self.class_names

    def class_source(self) -> str:
        """Where the class names come from, for messages."""
        if isinstance(self.class_names, str):
            return f"data.{self.name}.{self.class_names}"
        return f"the {self.name} dataset"

    def largest_image(self, options: Any) -> tuple[int, int] | None:
        """(height, width) of the largest image served; None: unbounded."""
        return self.image_size(options) if callable(self.image_size) else self.image_size

    def colours(self, num_classes: int) -> Palette:
        """The colours of class ids 0..num_classes-1: the registered palette when it has that many entries, else
        `default_palette(num_classes)` (no palette registered, or a job whose class count differs from it)."""
        if self.palette is not None and len(self.palette) == num_classes:
            return self.palette
        return default_palette(num_classes)

    def check(self, data: Any) -> None:
        """Check the options' ranges and rules (`kdray.config.options.check_options`)."""
        options = self.options_of(data)
        if options is not None:
            check_options(options, f"data.{self.name}")

    def make(self, data: Any, split: str, role: str, sample_check: int) -> Dataset:
        """The untransformed dataset of `split` (playing `role`) for the job's `data` section."""
        request = DatasetRequest(data.root, split, role, data.ignore_index, sample_check, self.options_of(data))
        if self.build is not None:
            return self.build(request)
        return self.dataset(request.root, split, request.ignore_index, sample_check)


DATASETS: dict[str, DatasetSpec] = {}  # name -> spec, in registration order (built-ins first, then plugins)


def register_dataset(name: str, *, class_names: tuple[str, ...] | str, paper_splits: tuple[str, str],
                     splits: tuple[str, ...] | None = None, void: int | None = None,
                     label_map: Mapping[int, int] | None = None,
                     image_size: tuple[int, int] | Callable[[Any], tuple[int, int]] | None = None,
                     eval_batch_one: bool = False, needs_root: bool = True, strict_class_count: bool = True,
                     options: type | None = None, build: Build | None = None,
                     smoke_overrides: Mapping[str, Any] | None = None,
                     palette: Sequence[Sequence[int]] | None = None) -> Callable[[type], type]:
    """Class decorator registering a `Dataset` class as the dataset `name` (see the module docstring).

    Raises ConfigError when `name` is not an identifier or is taken by another class, `options` is not a
    dataclass, `class_names` names no field of it, the splits are malformed, or `palette` is not one (r, g, b)
    triple of integers 0..255 per class name. Registering the same class again
    (a plugin imported twice) is a no-op.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"register_dataset: the name {name!r} must be an identifier (it is a config key)")
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ConfigError(f"register_dataset({name!r}): options must be a dataclass (the data.{name} section)")
    if isinstance(class_names, str):
        fields = {f.name for f in dataclasses.fields(options)} if options is not None else set()
        if class_names not in fields:
            raise ConfigError(f"register_dataset({name!r}): class_names={class_names!r} must name an option of "
                              f"its options dataclass, or be the tuple of names")
    else:
        class_names = tuple(class_names)
    if len(paper_splits) != 2 or (splits is not None and not set(paper_splits) <= set(splits)):
        raise ConfigError(f"register_dataset({name!r}): paper_splits must be (train, evaluation), among splits")
    colours = _palette(name, palette, None if isinstance(class_names, str) else len(class_names))

    def register(cls: type) -> type:
        previous = DATASETS.get(name)
        if previous is not None and _qualified(previous.dataset) != _qualified(cls):
            raise ConfigError(f"register_dataset: the dataset name {name!r} is taken by "
                              f"{_qualified(previous.dataset)}; {_qualified(cls)} needs another name")
        DATASETS[name] = DatasetSpec(
            name, cls, class_names, tuple(paper_splits), tuple(splits) if splits is not None else None, void,
            label_map, image_size, eval_batch_one, needs_root, strict_class_count, options, build,
            dict(smoke_overrides or {}), colours)
        return cls

    return register


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset `name`; ConfigError with a did-you-mean otherwise."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(str(name), list(DATASETS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"data.dataset: got {name!r}{hint}; registered: {', '.join(DATASETS)}")


HUE_START = 0.6  # blue: the hue of class 0 in a generated palette
RED_HUES = 0.04  # hues this close to 0 (red) are left to the error map


def default_palette(count: int) -> Palette:
    """`count` distinct colours for class ids 0..count-1, none black (black marks ignored pixels).

    Colour k has hue (HUE_START + k * phi) mod 1, phi = (sqrt(5) - 1) / 2 (the golden-ratio sequence: each new hue
    falls in the largest gap left by the previous ones). It starts at blue, and a hue within RED_HUES of red (0) is
    moved on by 2 * RED_HUES: red is the error map's, and class 0 (often the background, the largest area) must not
    look like errors. Saturation 0.95 or 0.6 (alternating with k), value 0.95, 0.75 or 0.55 (cycling with k // 2),
    converted from HSV to 8-bit RGB. A colour that repeats an earlier one (possible only
    among hundreds of classes, after rounding) is moved to the next unused one in RGB order.
    """
    phi = (5 ** 0.5 - 1) / 2
    colours: list[tuple[int, int, int]] = []
    used: set[tuple[int, int, int]] = {(0, 0, 0)}
    for k in range(count):
        hue, saturation, value = (HUE_START + k * phi) % 1.0, (0.95, 0.6)[k % 2], (0.95, 0.75, 0.55)[(k // 2) % 3]
        if min(hue, 1.0 - hue) < RED_HUES:  # red marks the error map's wrong pixels
            hue = (hue + 2 * RED_HUES) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        code = (round(255 * r) << 16) | (round(255 * g) << 8) | round(255 * b)
        while ((code >> 16) & 255, (code >> 8) & 255, code & 255) in used:
            code = (code + 1) % (1 << 24)
        colour = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
        used.add(colour)
        colours.append(colour)
    return tuple(colours)


def _palette(name: str, palette: Sequence[Sequence[int]] | None, count: int | None) -> Palette | None:
    """`palette` as a tuple of (r, g, b) int triples, checked: `count` entries (when the class names are known),
    each three integers 0..255. ConfigError naming the dataset and the entry otherwise."""
    if palette is None:
        return None
    colours = []
    for k, entry in enumerate(palette):
        ok = (isinstance(entry, Sequence) and len(entry) == 3
              and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in entry))
        if not ok:
            raise ConfigError(f"register_dataset({name!r}): palette[{k}] = {entry!r} must be an (r, g, b) triple of "
                              "integers 0..255")
        colours.append((int(entry[0]), int(entry[1]), int(entry[2])))
    if count is not None and len(colours) != count:
        raise ConfigError(f"register_dataset({name!r}): palette has {len(colours)} colours for {count} classes: one "
                          "(r, g, b) per class id, in id order")
    return tuple(colours)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
