# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""Calibrate and train a tiny SHIP model in every process of a distributed (gloo, CPU) launch.

Launched by ``tests/test_distributed.py``; by hand (see ``docs/reliability.md``)::

    OMP_WAIT_POLICY=PASSIVE python -m torch.distributed.run --standalone --nproc_per_node 2 tests/utils/distributed_train.py OUT
    OMP_WAIT_POLICY=PASSIVE accelerate launch --multi_gpu --num_processes 2 tests/utils/distributed_train.py OUT

(the script itself picks gloo and the CPU; ``accelerate launch --cpu --num_processes 2`` starts one process only
unless MPI is set up with ``--mpirun_hostfile``).

Every rank writes ``OUT/rank<r>.pt`` (this harness's own record, written after the checks below stop recording):

* ``calibration`` / ``calibration_uneven``: what ``initialize_ship_weights`` found on this rank's shard of the
  calibration images (``calibration_shards`` even and uneven contiguous shards), or the error it raised;
* ``training``: this rank's trained adapter tensors (the HF ``Trainer`` with DDP, global batch ``GLOBAL_BATCH``) and
  the error training raised, if any;
* ``writes``: every file this rank created, wrote, renamed or removed under ``OUT`` during calibration, training and
  ``save_model`` -- only rank 0 may write there -- followed by this rank's deliberate writes to ``OUT/canary_rank<r>``
  (which show that the recorder sees writes).

Rank 0's ``Trainer.save_model`` writes the adapter to ``OUT/adapter``. The single-process reference is the same
functions called with ``world_size == 1`` (``tests/test_distributed.py`` calls them in-process).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `utils`

import ship_peft  # noqa: E402
from utils import fill_prototypes, pixels, tiny_vit  # noqa: E402

GLOBAL_BATCH = 8
TRAIN_IMAGES = 24  # 3 optimizer steps per epoch
EPOCHS = 2
SEED = 1234
CALIBRATION_IMAGES = 24
UNEVEN_SPLIT = 16  # rank 0 gets images [0, 16) (4 batches of <= 5), rank 1 [16, 24) (2 batches)
CALIBRATION_CONFIG = dict(num_prompts=2, share_threshold=0.905, num_prototypes=5, num_attribute_prompts=3)
TRAIN_CONFIG = dict(num_prompts=3, prompt_layers=[0, 2, 3], num_prototypes=5, num_attribute_prompts=4)


def calibration_images() -> torch.Tensor:
    return pixels(CALIBRATION_IMAGES, seed=21)


def calibration_shards(world_size: int, uneven: bool = False) -> list[torch.Tensor]:
    """Contiguous shards of the calibration images, one per rank; concatenated in rank order they are the union."""
    images = calibration_images()
    if world_size == 1:
        return [images]
    if world_size == 2 and uneven:
        return [images[:UNEVEN_SPLIT], images[UNEVEN_SPLIT:]]
    return list(images.chunk(world_size))


def calibrate(shard: torch.Tensor) -> dict:
    """Calibrate a fresh adapter (levels and prototypes found from data) on ``shard``, batches of 5 images."""
    model = get_peft_model(tiny_vit(seed=3), ship_peft.ShipConfig(**CALIBRATION_CONFIG))
    loader = DataLoader([{"pixel_values": image} for image in shard], batch_size=5)
    result = ship_peft.initialize_ship_weights(model, loader, show_progress=False)
    prompts = ship_peft.get_prompt_bank(model).ship_prompts["default"]
    return {
        "prompt_layers": list(result.prompt_layers),
        "config_prompt_layers": list(model.peft_config["default"].prompt_layers),
        "affinity": result.affinity,
        "prototypes": prompts.prototypes.detach().clone(),
        "num_samples": result.num_samples,
    }


def train_dataset() -> Dataset:
    images = pixels(TRAIN_IMAGES, seed=22)
    labels = [(3 * i + 1) % 3 if i % 4 else i % 3 for i in range(TRAIN_IMAGES)]
    return Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels}).with_format("torch")


def train(output_dir: str, world_size: int, gradient_accumulation_steps: int = 1) -> dict:
    """Train with the HF Trainer: per-device batch ``GLOBAL_BATCH / world_size``, shuffled with a fixed seed.

    The Trainer's (accelerate's) distributed loader hands out consecutive per-device batches of one shuffled order
    (seedable sampler, the same permutation on every rank), so one step sees the same ``GLOBAL_BATCH`` images as a
    single process with batch ``GLOBAL_BATCH``; DDP averages the gradients of the per-rank mean losses.
    With ``gradient_accumulation_steps`` the per-device batch shrinks so that the global batch stays the same.
    Returns ``{"error": None or the message training raised, "adapter": trained tensors, "initial": the tensors
    before training}``; the adapter is saved
    (``Trainer.save_model``, to ``output_dir/adapter``) even when training raised.
    """
    model = get_peft_model(tiny_vit(seed=5), ship_peft.ShipConfig(**TRAIN_CONFIG))
    fill_prototypes(model, seed=5)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=GLOBAL_BATCH // (world_size * gradient_accumulation_steps),
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_train_epochs=EPOCHS,
        learning_rate=2e-2,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        weight_decay=0.01,
        seed=SEED,
        use_cpu=True,
        ddp_backend="gloo" if world_size > 1 else None,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset())
    initial = adapter_tensors(model)
    error = None
    try:
        trainer.train()
    except Exception as caught:  # noqa: BLE001 -- reported to the test; saving below is checked on its own
        error = f"{type(caught).__name__}: {caught}"
    trainer.save_model(os.path.join(output_dir, "adapter"))
    return {"error": error, "adapter": adapter_tensors(model), "initial": initial}


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if "ship_prompts" in name or "modules_to_save" in name
    }


class WriteRecorder:
    """Records every file the process creates, writes, renames or removes under ``root`` while ``active``.

    Python-level writes are seen through audit hooks (``open`` in a writing mode, ``os.mkdir``, ``os.rename``,
    ``os.replace``, ``os.remove``...); writers implemented outside Python (``torch.save``, safetensors' Rust writer)
    are wrapped wherever a loaded module holds a reference to them.
    """

    def __init__(self, root: Path):
        self.root = str(root.resolve())
        self.active = False
        self.writes: list[str] = []
        sys.addaudithook(self._audit)
        self._wrap_native_writers()

    def _record(self, what: str, path) -> None:
        if not self.active or isinstance(path, int):
            return
        try:
            path = os.fsdecode(path)
        except TypeError:
            return
        full = os.path.abspath(path)
        if full == self.root or full.startswith(self.root + os.sep):
            self.writes.append(f"{what} {os.path.relpath(full, self.root)}")

    def _audit(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
            )
            if writing:
                self._record("open", path)
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "shutil.copyfile"):
            self._record(event, args[-1] if event == "shutil.copyfile" else args[0])
        elif event == "os.rename":
            self._record(event, args[1])

    def _wrap_native_writers(self) -> None:
        originals = {id(torch.save): torch.save, id(safetensors.torch.save_file): safetensors.torch.save_file}
        wrappers = {}
        for original in originals.values():

            def wrapper(obj, path, *args, _original=original, **kwargs):
                if isinstance(path, (str, os.PathLike)):
                    self._record(_original.__module__ + "." + _original.__name__, path)
                return _original(obj, path, *args, **kwargs)

            wrappers[id(original)] = wrapper
        for module in list(sys.modules.values()):
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if id(value) in originals and value is originals[id(value)]:
                    try:
                        setattr(module, name, wrappers[id(value)])
                    except (AttributeError, TypeError):
                        pass


def main() -> None:
    if "RANK" not in os.environ or len(sys.argv) != 2:
        sys.exit(
            "usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/utils/distributed_train.py OUT "
            "(or accelerate launch --multi_gpu --num_processes 2 ...); RANK/WORLD_SIZE must be set by the launcher."
        )
    output_dir = Path(sys.argv[1])
    output_dir.mkdir(parents=True, exist_ok=True)
    recorder = WriteRecorder(output_dir)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    record: dict = {"rank": rank, "world_size": world_size}

    def calibrate_rank(uneven: bool) -> dict:
        try:
            return calibrate(calibration_shards(world_size, uneven)[rank])
        except Exception as error:  # noqa: BLE001 -- reported to the test, which shows it
            return {"error": f"{type(error).__name__}: {error}"}

    def save_record() -> None:
        recorder.active = False
        record["writes"] = list(recorder.writes)
        torch.save(record, output_dir / f"rank{rank}.pt")
        recorder.active = True

    recorder.active = True
    record["calibration"] = calibrate_rank(uneven=False)
    dist.barrier()
    record["training"] = train(str(output_dir), world_size)
    dist.barrier()
    # canary: a write by every rank, through each kind of writer the recorder watches, proves it records writes
    canary = output_dir / f"canary_rank{rank}"
    canary.mkdir()
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(canary / "tensors.safetensors"))
    torch.save({}, canary / "object.pt")
    (canary / "text.json").write_text("{}")
    save_record()
    # last, so that a gather that cannot handle shards of different sizes cannot spoil the checks above
    record["calibration_uneven"] = calibrate_rank(uneven=True)
    dist.barrier()
    save_record()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
