"""ADE20K as the MIT Scene Parsing benchmark serves it (ADEChallengeData2016): 150 classes, 20210 training and
2000 validation images of varying size (most around 512 pixels on the short side).

    <root>/images/{training,validation}/ADE_train_<8 digits>.jpg      (ADE_val_<8 digits>.jpg in validation)
    <root>/annotations/{training,validation}/<the image's stem>.png    grey PNGs, values 0..150

Label rule (SceneParsing's, as CIRKD's dataset/ade20k.py and mmsegmentation's `reduce_zero_label` apply it): an
annotation value v in 1..150 is class v - 1, in the order of CSAIL's objectInfo150 list (below); 0 marks pixels
that belong to none of the 150 classes and is read as the ignore value. An annotation is paired with its image by
file stem; a lossy .jpg (or a .mat) with an annotation's name in its place is named as such. The test images'
annotations are not public, so the splits are training and validation, the papers' pair. The images differ in
size, so they are evaluated one at a time, and no largest size is declared.

Class names: objectInfo150's first name of each entry (the short names mmsegmentation's ADE20KDataset lists),
with '_' between words as in the Cityscapes names. Colours: the SceneParsing palette that goes with them (CSAIL's
color150, as mmsegmentation's ADE20KDataset lists it), one (r, g, b) per class id.
"""

from __future__ import annotations

from pathlib import Path

from kdray.data.files import (
    SAMPLE_MASKS,
    FileSegmentation,
    LabelCodec,
    Sample,
    existing_dir,
    existing_root,
    pair_by_key,
    stand_in_error,
)
from kdray.data.registry import register_dataset
from kdray.errors import DataError

# Ten to a line: ids 0..9, 10..19, ..., 140..149 (the line of ids 70..79 wraps once).
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest_of_drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool_table", "pillow", "screen_door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee_table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen_island", "computer", "swivel_chair",
        "boat", "bar", "arcade_machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television_receiver",
    "airplane", "dirt_track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer_belt", "canopy", "washer", "plaything", "swimming_pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade_name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic_light", "tray", "ashcan", "fan",
    "pier", "crt_screen", "plate", "monitor", "bulletin_board", "shower", "radiator", "glass", "clock", "flag",
)
# (r, g, b) of each class id. Road (6) and skyscraper (48) share (140, 140, 140) in the published palette.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),           # 0..4
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),         # 5..9
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),             # 10..14
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),             # 15..19
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),            # 20..24
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),             # 25..29
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),            # 30..34
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),             # 35..39
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),               # 40..44
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),        # 45..49
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),               # 50..54
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),                # 55..59
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),             # 60..64
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),              # 65..69
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),               # 70..74
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),              # 75..79
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),           # 80..84
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),               # 85..89
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),               # 90..94
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),             # 95..99
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),             # 100..104
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),              # 105..109
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),           # 110..114
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),            # 115..119
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),            # 120..124
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),           # 125..129
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),              # 130..134
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),              # 135..139
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),              # 140..144
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),            # 145..149
)
UNLABELLED = 0  # the annotation value of pixels in none of the 150 classes
# annotation value -> class id: 1..150 -> 0..149 (0 is UNLABELLED, read as the ignore value)
ANNOTATION_TO_CLASS = {value: value - 1 for value in range(1, len(CLASS_NAMES) + 1)}
LAYOUT = "images/<split>/*.jpg and annotations/<split>/*.png (ADEChallengeData2016)"


def annotation_codec(ignore_index: int) -> LabelCodec:
    """The SceneParsing label rule: 0 -> `ignore_index`, v in 1..150 -> v - 1; any other value is refused."""
    return LabelCodec({UNLABELLED: ignore_index, **ANNOTATION_TO_CLASS},
                      f"ADE20K annotation values (0..{len(CLASS_NAMES)}, {UNLABELLED} = unlabelled)")


@register_dataset("ade20k", class_names=CLASS_NAMES, splits=("training", "validation"),
                  paper_splits=("training", "validation"), void=UNLABELLED, label_map=ANNOTATION_TO_CLASS,
                  eval_batch_one=True, palette=PALETTE)
class ADE20K(FileSegmentation):
    dataset = "ade20k"

    def __init__(self, root: str | Path, split: str = "training", ignore_index: int = 255,
                 sample_check: int = SAMPLE_MASKS):
        root = existing_root(root, self.dataset, LAYOUT)
        image_dir = existing_dir(root / "images" / split, f"the ADE20K {split} images")
        annotation_dir = existing_dir(root / "annotations" / split, f"the ADE20K {split} annotations")
        images = {p.stem: p for p in image_dir.glob("*.jpg")}
        if not images:
            raise DataError(f"{image_dir}: no *.jpg images: the ADE20K {split} split is empty")
        annotations = {p.stem: p for p in annotation_dir.glob("*.png")}
        missing = [(annotation_dir / f"{stem}.png",) for stem in sorted(images) if stem not in annotations]
        if missing and (stand_in := stand_in_error(missing, len(images))):
            raise stand_in
        pairs = pair_by_key(images, annotations, "annotation", lambda p: str(annotation_dir / f"{p.stem}.png"),
                            lambda p: str(image_dir / f"{p.stem}.jpg"))
        codec = annotation_codec(ignore_index)
        samples = [Sample(image, annotation, codec) for image, annotation in pairs]
        super().__init__(samples, split, CLASS_NAMES, ignore_index, sample_check)
