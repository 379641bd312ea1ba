#!/usr/bin/env bash
# benchmarks/extend.py on one GPU machine that has no package index and takes at most 64 MiB per call:
# SmolLM2-135M-Instruct travels as a GGUF file in two halves (../shared/tools/smollm2-parts.sh makes
# .smola/ and .smolb/), the corpus and the wheels of DeepSpeed and mosaicml-streaming in a third folder.
# Run from the repository root, one part per call, on one warm machine (/tmp is kept between calls):
#
#   bash benchmarks/extend_gpu.sh setup     # carry .whl/ and .extdata/: installs, keeps the corpus, loss benchmark
#   bash benchmarks/extend_gpu.sh smola     # carry .smola/: keeps the first half
#   bash benchmarks/extend_gpu.sh prepare   # carry .smolb/ and .smolcfg/: rejoins, converts, lh-import, evaluates
#   bash benchmarks/extend_gpu.sh train NAME FRACTION [extend.py train options and overrides...]
#
# .extdata/ is the corpus as `extend.py prepare` builds it, made on a CPU machine beforehand (tokenizing
# takes minutes): `python benchmarks/extend.py prepare --hf DIR --work /tmp/extend/work --data
# /tmp/extend/data` there, then copy /tmp/extend/data to .extdata/. The lh-import folder sits at the same
# path on both machines, so the tokenizer the corpus records is found on either. .smolcfg/ holds the
# folder's config.json, generation_config.json and tokenizer files as transformers 4.x writes them on
# the CPU machine (the smollm2-parts.sh header's command): transformers 5 writes a config.json that
# lh-import does not read (rope_parameters) and refuses save_pretrained for a GGUF-loaded model, so
# on the GPU machine only the de-quantized weights are written, with safetensors. Each part writes its
# results as .tar.gz files under $OUT (the device tool returns files at most two folders down).
set -uo pipefail
OUT=${OUT:-/tmp/extend_out}
WORK=/tmp/extend/work
DATA=/tmp/extend/data
RESULTS=/tmp/extend/results
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"

need() { [ -e "$1" ] || { echo "extend_gpu: error: $1 is missing ($2)"; exit 2; }; }

case "${1:-}" in
setup)
    need .whl "carry .whl/"; need .extdata/lh_data.json "carry .extdata/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    rm -rf "$DATA" && mkdir -p "$(dirname "$DATA")" && cp -r .extdata "$DATA" || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, deepspeed, streaming; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)'
    # The loss head's memory and time at real vocabularies (lh-train's step, SmolLM2's shape); full
    # checkpointing without compile, so that the logits, not the activations, set the peak.
    timeout -k 10 "${LOSS_BUDGET:-200}" python3 benchmarks/loss_memory.py --warmup 0 --steps 1 \
        --commit "${COMMIT:-unknown}" --out "$OUT" parallel.activation_checkpointing=full parallel.compile=false
    ;;
smola)
    need .smola/gguf.part.aa "carry .smola/"
    rm -rf /tmp/smol && mkdir -p /tmp/smol && cp .smola/gguf.part.aa /tmp/smol/ && du -sh /tmp/smol
    ;;
prepare)
    need /tmp/smol/gguf.part.aa "run the smola part first, on the same warm machine"
    need .smolb/gguf.part.ab "carry .smolb/"
    need "$DATA/lh_data.json" "run the setup part first, on the same warm machine"
    cat /tmp/smol/gguf.part.aa .smolb/gguf.part.ab > "/tmp/smol/$GGUF" || exit 1
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .smolb/*.whl || exit 1
    need .smolcfg/config.json "carry .smolcfg/"
    rm -rf /tmp/smolhf && mkdir -p /tmp/smolhf && cp .smolcfg/* /tmp/smolhf/ || exit 1
    (cd /tmp/smol && python3 -c "
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained('.', gguf_file='$GGUF', dtype=torch.bfloat16)
# Tied embeddings: lm_head.weight is embed_tokens.weight, which the folder holds once.
state = {k: v.contiguous() for k, v in model.state_dict().items() if k != 'lm_head.weight'}
save_file(state, '/tmp/smolhf/model.safetensors', metadata={'format': 'pt'})
") 2>&1 | grep -v "de-quantizing" || exit 1
    python3 benchmarks/extend.py prepare --hf /tmp/smolhf --work "$WORK" --data "$DATA" --results "$RESULTS" || exit 1
    tar czf "$OUT/original.tar.gz" -C "$RESULTS" original
    ;;
train)
    name=${2:?name}; fraction=${3:?fraction}; shift 3
    need "$WORK/import/config.yaml" "run the prepare part first, on the same warm machine"
    python3 benchmarks/extend.py train "$name" --lighthouse-fraction "$fraction" --work "$WORK" --data "$DATA" \
        --results "$RESULTS" "$@" || exit 1
    tar czf "$OUT/$name.tar.gz" -C "$RESULTS" "$name"
    ;;
*)
    echo "usage: bash benchmarks/extend_gpu.sh setup | smola | prepare | train NAME FRACTION [options]" >&2
    exit 2
    ;;
esac
