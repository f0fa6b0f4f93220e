# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""VTAB-1k with the standard protocol: hyper-parameters are chosen on the 800-train / 200-validation split, then
one final run on all 1000 training images reports top-1 on the test split at the end of training (nothing is
selected on test). Every task adds one JSON row to a results file; :func:`results_table` assembles the 19 tasks.

Data comes either from the common ``vtab-1k/<task>/`` folder layout (image lists ``train800.txt``, ``val200.txt``,
``train800val200.txt``, ``test.txt`` of ``relative/path label`` lines, as used by the SHIP, NOAH and SSF code), or
from any dataset (Hub id, ``save_to_disk`` folder) with splits of those names.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from accelerate.utils import broadcast_object_list
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, concatenate_datasets
from datasets import Image as ImageFeature

from .data import IMAGE, LABEL, find_columns, load_dataset_dict, standardize, with_pixels
from ..safe_io import write_atomically
from .errors import InputError
from .training import TrainedMethod, TrainSettings, distributed_state, predict, say, train_method

SPLITS = ("train800", "val200", "train800val200", "test")
SEARCH_TRAIN, SEARCH_VALIDATION, FINAL_TRAIN, TEST = SPLITS
SEARCH_RESULT = "search.json"

#: Hyper-parameters searched on train800 -> val200: TrainSettings fields and ShipConfig fields.
GRID_SETTINGS = ("learning_rate", "weight_decay")
GRID_SHIP = ("num_prompts", "share_threshold")


@dataclass(frozen=True)
class VtabTask:
    """A VTAB-1k task: its group, its number of classes, and the folder names it goes by."""

    name: str
    group: str
    num_classes: int
    folders: tuple[str, ...]


VTAB_TASKS = {
    task.name: task
    for task in (
        VtabTask("cifar100", "Natural", 100, ("cifar100", "cifar")),
        VtabTask("caltech101", "Natural", 102, ("caltech101",)),
        VtabTask("dtd", "Natural", 47, ("dtd",)),
        VtabTask("oxford_flowers102", "Natural", 102, ("oxford_flowers102",)),
        VtabTask("oxford_pet", "Natural", 37, ("oxford_pet", "oxford_iiit_pet")),
        VtabTask("svhn", "Natural", 10, ("svhn",)),
        VtabTask("sun397", "Natural", 397, ("sun397",)),
        VtabTask("patch_camelyon", "Specialized", 2, ("patch_camelyon",)),
        VtabTask("eurosat", "Specialized", 10, ("eurosat",)),
        VtabTask("resisc45", "Specialized", 45, ("resisc45",)),
        VtabTask("diabetic_retinopathy", "Specialized", 5, ("diabetic_retinopathy",)),
        VtabTask("clevr_count", "Structured", 8, ("clevr_count",)),
        VtabTask("clevr_dist", "Structured", 6, ("clevr_dist",)),
        VtabTask("dmlab", "Structured", 6, ("dmlab",)),
        VtabTask("kitti", "Structured", 4, ("kitti",)),
        VtabTask("dsprites_loc", "Structured", 16, ("dsprites_loc",)),
        VtabTask("dsprites_ori", "Structured", 16, ("dsprites_ori",)),
        VtabTask("smallnorb_azi", "Structured", 18, ("smallnorb_azi",)),
        VtabTask("smallnorb_ele", "Structured", 9, ("smallnorb_ele",)),
    )
}
GROUPS = ("Natural", "Specialized", "Structured")


def get_task(name: str) -> VtabTask:
    """The VTAB-1k task called ``name``, or a clear error listing the 19 names."""
    if name not in VTAB_TASKS:
        raise InputError(f"Unknown VTAB-1k task {name!r}; the tasks are: {', '.join(VTAB_TASKS)}.")
    return VTAB_TASKS[name]


def _task_folder(task: VtabTask, data_root: Path) -> Path:
    if (data_root / f"{TEST}.txt").is_file():
        return data_root
    for folder in task.folders:
        if (data_root / folder / f"{TEST}.txt").is_file():
            return data_root / folder
    raise InputError(
        f"--data-root {str(data_root)!r} holds no VTAB-1k task {task.name!r}: expected "
        f"{' or '.join(str(data_root / folder / 'test.txt') for folder in task.folders)} (the vtab-1k/<task>/ layout "
        f"with train800.txt, val200.txt, train800val200.txt and test.txt)."
    )


def _read_image_list(folder: Path, split: str) -> Dataset:
    path = folder / f"{split}.txt"
    if not path.is_file():
        raise InputError(f"{path} is missing: a VTAB-1k task folder needs {', '.join(s + '.txt' for s in SPLITS)}.")
    images, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, _, label = line.rpartition(" ")
        if not name or not label.strip().isdigit():
            raise InputError(f"{path}, line {number}: expected 'relative/image/path label', got {line!r}.")
        images.append(str(folder / name))
        labels.append(int(label))
    missing = [image for image in images if not Path(image).is_file()]
    if missing:
        raise InputError(f"{path} lists {len(missing)} images that do not exist, e.g. {missing[0]}; check --data-root.")
    return Dataset.from_dict(
        {IMAGE: images, LABEL: labels}, features=Features({IMAGE: ImageFeature(), LABEL: Value("int64")})
    )


def _task_labels(task: VtabTask, splits: DatasetDict) -> DatasetDict:
    """Check that every label is a class of ``task``; the label becomes a ``ClassLabel`` of the task's size."""
    for split, dataset in splits.items():
        labels = dataset[LABEL]
        if labels and max(labels) >= task.num_classes:
            raise InputError(
                f"Split {split!r} of {task.name} has label {max(labels)}, but the task has {task.num_classes} classes "
                f"(labels 0..{task.num_classes - 1}); is this the right task?"
            )
    feature = splits[TEST].features[LABEL]
    if isinstance(feature, ClassLabel) and feature.num_classes == task.num_classes:
        return splits
    return splits.cast_column(LABEL, ClassLabel(num_classes=task.num_classes))


def load_task(
    task: VtabTask,
    data_root: Optional[str] = None,
    dataset: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> DatasetDict:
    """The four VTAB-1k splits of ``task`` (``image`` / ``label`` columns), from a ``vtab-1k`` folder or a dataset.

    ``dataset`` may contain ``{task}``, replaced by the task's name (e.g. ``my-org/vtab-1k-{task}``); a dataset
    without ``train800val200`` gets the concatenation of ``train800`` and ``val200``.
    """
    if (data_root is None) == (dataset is None):
        raise InputError(
            "Give exactly one of --data-root (a vtab-1k folder) and --dataset (a dataset with VTAB-1k splits)."
        )
    if data_root is not None:
        folder = _task_folder(task, Path(data_root).expanduser())
        splits = DatasetDict({split: _read_image_list(folder, split) for split in SPLITS})
    else:
        loaded = load_dataset_dict(dataset.format(task=task.name))
        columns = find_columns(next(iter(loaded.values())).features, image_column, label_column)
        splits = standardize(loaded, *columns)
        missing = [split for split in (SEARCH_TRAIN, SEARCH_VALIDATION, TEST) if split not in splits]
        if missing:
            raise InputError(
                f"--dataset {dataset!r} lacks the VTAB-1k split(s) {missing}; its splits are {list(splits)}. A VTAB-1k "
                f"dataset needs train800, val200 and test (train800val200 is optional)."
            )
        if FINAL_TRAIN not in splits:
            splits[FINAL_TRAIN] = concatenate_datasets([splits[SEARCH_TRAIN], splits[SEARCH_VALIDATION]])
        splits = DatasetDict({split: splits[split] for split in SPLITS})
    return _task_labels(task, splits)


def grid_candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the searched values, in order (the first value of every list first)."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[name] for name in names))]


def with_candidate(
    candidate: dict[str, Any], settings: TrainSettings, ship_values: dict[str, Any]
) -> tuple[TrainSettings, dict[str, Any]]:
    """The training settings and SHIP hyper-parameters with the searched values of ``candidate`` put in."""
    run_settings = dataclasses.replace(settings, **{k: v for k, v in candidate.items() if k in GRID_SETTINGS})
    return run_settings, {**ship_values, **{k: v for k, v in candidate.items() if k in GRID_SHIP}}


def recipe(settings: TrainSettings, ship_values: dict[str, Any]) -> dict[str, Any]:
    """The settings a run's result depends on, as they read back from JSON: the training settings (without those
    that only change logging) and SHIP's hyper-parameters."""
    settings_values = dataclasses.asdict(settings)
    for volatile in ("show_progress", "report_to", "logging_steps", "num_workers"):
        del settings_values[volatile]
    return json.loads(json.dumps({"settings": settings_values, "ship": ship_values}))


def _search_run(
    candidate: dict[str, Any],
    model_path: str,
    label_names: list[str],
    data: dict[str, Dataset],
    settings: TrainSettings,
    ship_values: dict[str, Any],
    run_dir: Path,
) -> float:
    """val200 top-1 of one search candidate trained on train800 (``data``: the task's splits).

    The result is kept in ``run_dir/search.json`` with everything it depends on, so a search that was interrupted
    and is started again with the same settings reuses the runs it finished."""
    record = {"candidate": candidate, "model": model_path, **recipe(settings, ship_values)}
    earlier = _earlier_result(run_dir / SEARCH_RESULT, record)
    if earlier is not None:
        say(f"  val200 top-1 {earlier:.4f}, from an earlier run ({run_dir / SEARCH_RESULT})")
        return earlier
    run_settings, run_ship = with_candidate(candidate, settings, ship_values)
    trained = train_method("ship", model_path, label_names, data[SEARCH_TRAIN], run_settings, run_ship, run_dir)
    top1 = predict(trained.trainer, data[SEARCH_VALIDATION], "val200")[0]
    if distributed_state().is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**record, "val200_top1": top1}, indent=1)
        write_atomically(run_dir / SEARCH_RESULT, lambda path: Path(path).write_text(text, encoding="utf-8"))
    return top1


def _earlier_result(path: Path, record: dict[str, Any]) -> Optional[float]:
    """The val200 top-1 saved in ``path`` if it was obtained with exactly ``record``'s settings (read on the main
    process and shared with the others, so that all processes take the same decision)."""
    found = [None]
    if distributed_state().is_main_process and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if {key: saved.get(key) for key in record} == record:
            found = [saved.get("val200_top1")]
    return broadcast_object_list(found)[0]


def run_task(
    task: VtabTask,
    splits: DatasetDict,
    model_path: str,
    image_processor: Any,
    settings: TrainSettings,
    ship_values: dict[str, Any],
    grid: dict[str, list[Any]],
    output_dir: Path,
) -> tuple[dict[str, Any], TrainedMethod]:
    """Search ``grid`` on train800 -> val200 (skipped for a single candidate), train the best candidate on
    train800val200, and report its top-1 on test at the end of training. Returns the result row and the final run."""
    label_names = splits[TEST].features[LABEL].names
    data = {split: with_pixels(dataset, image_processor) for split, dataset in splits.items()}
    candidates = grid_candidates(grid)
    search = []
    if len(candidates) > 1:
        for index, candidate in enumerate(candidates):
            say(f"[{task.name}] search {index + 1}/{len(candidates)}: {candidate}")
            run_dir = output_dir / "search" / str(index)
            top1 = _search_run(candidate, model_path, label_names, data, settings, ship_values, run_dir)
            search.append({**candidate, "val200_top1": top1})
        best = max(search, key=lambda entry: entry["val200_top1"])  # the first of equals
        selected = {name: best[name] for name in grid}
    else:
        selected = candidates[0]
    say(f"[{task.name}] final run on train800val200 with {selected}")
    final_settings, final_ship = with_candidate(selected, settings, ship_values)
    final = train_method(
        "ship", model_path, label_names, data[FINAL_TRAIN], final_settings, final_ship, output_dir / "final"
    )
    row = {
        "task": task.name,
        "group": task.group,
        "top1": predict(final.trainer, data[TEST], TEST)[0],
        "selected": selected,
        "search": search,
        "prompt_layers": final.calibration.prompt_layers,
        "model": model_path,
        "num_train": len(splits[FINAL_TRAIN]),
        "num_test": len(splits[TEST]),
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "trainable_parameters": final.trainable_parameters,
        "recipe": recipe(final_settings, final_ship),
        "protocol": "grid on train800 -> val200, final run on train800val200, top-1 on test at the end of training",
    }
    return row, final


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file; a task run several times keeps its last row."""
    if not Path(path).is_file():
        raise InputError(f"No VTAB-1k results file at {path}; run `ship-peft vtab1k --task ...` first.")
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return list({row["task"]: row for row in rows}.values())


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of top-1 per task (in VTAB order), group means, and the mean of the group means."""
    by_task = {row["task"]: row["top1"] * 100 for row in rows}
    lines = ["| group | task | top-1 |", "|---|---|---:|"]
    group_means = {}
    for group in GROUPS:
        tasks = [name for name, task in VTAB_TASKS.items() if task.group == group]
        done = [name for name in tasks if name in by_task]
        lines += [f"| {group} | {name} | {by_task[name]:.2f} |" for name in done]
        if done:
            group_means[group] = sum(by_task[name] for name in done) / len(done)
            lines.append(f"| {group} | **mean** ({len(done)}/{len(tasks)} tasks) | **{group_means[group]:.2f}** |")
    if group_means:
        lines.append(f"| all | **mean of group means** | **{sum(group_means.values()) / len(group_means):.2f}** |")
    return "\n".join(lines)
