# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
"""The parity fixtures ``tests/fixtures/ship_reference_{a,c}.json``: how ``scripts/make_reference_fixture.py``
derives them from the authors' outputs, and how the tests rebuild their inputs.

The reference outputs (``../shared/reference-outputs/golden_<case>.{json,safetensors}``, see the README there) are
outputs of the official SHIP code on small random ViT-B-shaped models, in float64. The weights, prompts, prototypes
and pixels in them were not trained: the recorded recipe (``golden_<case>.json["init"]``) draws every official
parameter ``N(mean, std)`` in registration order from ``torch.Generator().manual_seed(seed)`` in float64, then the
prototypes ``[16, D]`` and the pixels ``[B, 3, 224, 224]`` ``N(0, 1)``; the values used (and stored) are those draws
rounded to float32. So a fixture only needs the recipe -- official name, the transformers / ship names it maps to,
shape, mean, std, in draw order -- plus the expected results, and stays small (about 100 kB per case instead of
6.5 MB). :func:`regenerate_tensors` rebuilds the inputs from a fixture; this script checks that they are bitwise
the stored tensors before it writes anything, and records a sha256 of them so that the test can tell a changed
random stream apart from a changed ``ship_peft``.

Each fixture holds: the case's ViT and SHIP settings, the draws, the labels, and the expected float64 results:
``logits_train``, ``logits_eval``, ``logits_noprompt``, ``ce_loss``, ``matching_loss``, ``total_loss``, the ordered
top-k token indices of every attribute layer (``ap_topk[k][b]``) and of the matching loss (``match_topk[b]``), and
the gradient of the total loss for every prompt tensor and the classifier (``grads``, full tensors). The
``debug.*`` tensors are not used.

Usage (from the repository root; the default source is ``../shared/reference-outputs``)::

    python scripts/make_reference_fixture.py [path/to/reference-outputs]

``tests/test_reference_parity.py::test_fixture_matches_shared`` checks that the committed fixtures are what this
script makes, wherever ``../shared`` is present.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

CASES = ("a", "c")
FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures"
DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "reference-outputs"

#: official (timm ``blocks.{i}.``) module -> transformers-5 ``vit.layers.{i}.`` module
_BLOCK_MODULES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.q": "attention.q_proj",
    "attn.k": "attention.k_proj",
    "attn.v": "attention.v_proj",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
#: the golden tensors the recipe regenerates, besides the official parameters (drawn after them, N(0, 1))
_EXTRA_DRAWS = ("ship.prototypes", "inputs.pixel_values")
#: expected results copied from the golden safetensors (float64)
_OUTPUTS = ("logits_train", "logits_eval", "logits_noprompt", "ce_loss", "matching_loss", "total_loss")


def fixture_path(case: str) -> Path:
    return FIXTURE_DIR / f"ship_reference_{case}.json"


def target_names(official: str, num_attribute_levels: int) -> list[str]:
    """Names in the golden files (transformers-5 ``ViTForImageClassification`` / ``ship.*``) of an official parameter.

    ``attribute_prompt`` ``[A_lv, A, D]`` is one draw that holds every ``ship.ap.{k}``; ``compound_prompts_visual.j``
    ``[1, K, D]`` is ``ship.sip.j`` ``[K, D]`` (same values, same order).
    """
    fixed = {
        "cls_token": "vit.embeddings.cls_token",
        "pos_embed": "vit.embeddings.position_embeddings",
        "semantic_share_prompt": "ship.ssp",
        "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
        "norm.weight": "vit.layernorm.weight",
        "norm.bias": "vit.layernorm.bias",
        "head.weight": "classifier.weight",
        "head.bias": "classifier.bias",
    }
    if official in fixed:
        return [fixed[official]]
    if official == "attribute_prompt":
        return [f"ship.ap.{k}" for k in range(num_attribute_levels)]
    match = re.fullmatch(r"compound_prompts_visual\.(\d+)", official)
    if match:
        return [f"ship.sip.{match.group(1)}"]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", official)
    if match and match.group(2) in _BLOCK_MODULES:
        return [f"vit.layers.{match.group(1)}.{_BLOCK_MODULES[match.group(2)]}.{match.group(3)}"]
    raise KeyError(f"no transformers name known for official parameter {official!r}")


def regenerate_tensors(fixture: dict) -> dict[str, torch.Tensor]:
    """The inputs of a fixture's case (weights, prompts, prototypes, pixels), float32, named as in the golden files.

    Draw ``i`` is ``torch.empty(shape, float64).normal_(mean, std)`` from one ``torch.Generator`` seeded with
    ``fixture["seed"]``, rounded to float32; a draw that holds several tensors is split along its first dimension.
    """
    generator = torch.Generator().manual_seed(fixture["seed"])
    tensors = {}
    for draw in fixture["draws"]:
        values = torch.empty(draw["shape"], dtype=torch.float64).normal_(draw["mean"], draw["std"], generator=generator)
        values = values.to(torch.float32)
        parts = values.unbind(0) if len(draw["names"]) > 1 else (values,)
        for name, part in zip(draw["names"], parts, strict=True):
            tensors[name] = part.contiguous()
    return tensors


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and float32 bytes of ``tensors``, in their order."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_fixture(source: Path, case: str) -> dict:
    """The fixture of ``case`` made from ``source/golden_<case>.{json,safetensors}``; raises unless the recipe
    regenerates every stored input bitwise."""
    meta = json.loads((source / f"golden_{case}.json").read_text())
    golden = load_file(source / f"golden_{case}.safetensors")
    model, ship = meta["model"], meta["ship"]
    num_attribute_levels = ship["num_ap"]

    draws = []
    for official, (mean, std) in meta["init"]["recipe"].items():
        names = target_names(official, num_attribute_levels)
        shape = list(golden[names[0]].shape)
        if len(names) > 1:
            shape = [len(names)] + shape
        draws.append({"official": official, "names": names, "shape": shape, "mean": mean, "std": std})
    for name in _EXTRA_DRAWS:
        draws.append({"official": None, "names": [name], "shape": list(golden[name].shape), "mean": 0.0, "std": 1.0})

    fixture = {
        "case": case,
        "source": f"reference-outputs/golden_{case}.* (official SHIP code, timm 0.5.4, float64); "
        "made by scripts/make_reference_fixture.py",
        "seed": meta["seed"],
        "init_note": meta["init"]["note"],
        "vit_config": {
            "image_size": model["image_size"],
            "patch_size": model["patch_size"],
            "hidden_size": model["embed_dim"],
            "num_hidden_layers": model["depth"],
            "num_attention_heads": model["num_heads"],
            "intermediate_size": model["intermediate_size"],
            "layer_norm_eps": model["layer_norm_eps"],
            "num_labels": model["num_classes"],
        },
        "ship": {
            "num_prompts": ship["K"],
            "prompt_layers": ship["visual_prompt_indices"],
            "num_prototypes": ship["prototypes_shape"][0],
            "num_shared_prompts": ship["ssp_len"],
            "num_attribute_prompts": ship["ap_len"],
            "attribute_layers": [ship["ap_layers"][str(k)] for k in range(num_attribute_levels)],
            "attribute_mix": ship["ap_mix_scale"],
            "prompt_attention_weight": ship["decoupled_scale"],
            "matching_loss_weight": ship["matching_weight"],
            "matching_top_k": ship["matching_topk"],
        },
        "draws": draws,
        "labels": golden["inputs.labels"].tolist(),
        "inputs_sha256": None,
        "expected": {},
    }

    tensors = regenerate_tensors(fixture)
    stored = [n for n in golden if not n.startswith(("outputs.", "grad.", "debug.", "inputs.labels"))]
    if sorted(stored) != sorted(tensors):
        raise ValueError(f"the recipe draws {sorted(set(tensors) ^ set(stored))} differently from the stored tensors")
    for name, tensor in tensors.items():
        if golden[name].dtype != torch.float32 or not torch.equal(tensor, golden[name]):
            raise ValueError(f"{name}: the recipe does not regenerate the stored tensor bitwise")
    fixture["inputs_sha256"] = tensors_sha256(tensors)

    expected = {name: golden[f"outputs.{name}"].tolist() for name in _OUTPUTS}
    expected["ap_topk"] = [golden[f"debug.ap.{k}.topk"].tolist() for k in range(num_attribute_levels)]
    expected["match_topk"] = golden["debug.match.topk"].tolist()
    if expected["ap_topk"] != meta["results"]["ap_topk"] or expected["match_topk"] != meta["results"]["match_topk"]:
        raise ValueError("the top-k indices in the json and in the safetensors disagree")
    expected["grads"] = {
        name[len("grad."):]: golden[name].tolist() for name in golden if name.startswith("grad.")
    }
    fixture["expected"] = expected
    return fixture
