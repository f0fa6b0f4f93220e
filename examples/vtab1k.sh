#!/usr/bin/env bash
# Copyright 2026 The ship-peft authors. Licensed under the Apache License, Version 2.0.
#
# SHIP on all 19 VTAB-1k tasks with the standard protocol and the reference recipe (SHIP_METHOD.md §7): per task,
# the grid is searched on train800 -> val200, the best setting is trained on train800val200, and top-1 on test at the
# end of training is appended to OUT/results.jsonl; tasks already there are skipped. Finally the table is printed.
#
#   examples/vtab1k.sh /data/vtab-1k                      # ViT-B/16 in21k, the recipe's grid (144 runs a task)
#   SHIP_PEFT="accelerate launch --num_processes 4 -m ship_peft" examples/vtab1k.sh /data/vtab-1k --batch-size 16
#   OUT=outputs/vtab1k-k10 examples/vtab1k.sh /data/vtab-1k --num-prompts 10 --lr 0.001 0.01 0.1
#
# /data/vtab-1k/<task>/ holds train800.txt, val200.txt, train800val200.txt, test.txt ("relative/path label" lines)
# and the images, the layout of the SHIP, NOAH and SSF code. Extra arguments go to every `ship-peft vtab1k` call.
# Started again after an interruption, it skips finished tasks and reuses the finished search runs of the others.
set -euo pipefail
DATA_ROOT=${1:?usage: examples/vtab1k.sh VTAB_1K_ROOT [ship-peft vtab1k flags]}
shift
OUT=${OUT:-outputs/vtab1k}
SHIP_PEFT=${SHIP_PEFT:-ship-peft}
TASKS="cifar100 caltech101 dtd oxford_flowers102 oxford_pet svhn sun397 patch_camelyon eurosat resisc45
diabetic_retinopathy clevr_count clevr_dist dmlab kitti dsprites_loc dsprites_ori smallnorb_azi smallnorb_ele"
for TASK in $TASKS; do
  if [ -f "$OUT/results.jsonl" ] && grep -q "\"task\": \"$TASK\"" "$OUT/results.jsonl"; then
    echo "$TASK: already in $OUT/results.jsonl"
    continue
  fi
  $SHIP_PEFT vtab1k --task "$TASK" --data-root "$DATA_ROOT" --output-dir "$OUT" "$@"
done
ship-peft vtab1k-table "$OUT/results.jsonl"
