# Sourced by the device-call scripts (benchmarks/results-*/*/call*.sh), from the repository root of
# the tree carried to the GPU machine: the environment every call uses, $OUT/logs for the outputs,
# and /tmp/shim, an import path where unipelt, unipelt_plugins and unipelt_kernels resolve to this
# tree with the entry points of pyproject.toml (what `pip install -e .` would give; the device's
# python has no install of this tree). Use PYTHONPATH=$SHIM for pytest and for anything that loads
# the plugins through their entry points; PYTHONPATH=. is enough for benchmarks/speed.py.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=. TORCHINDUCTOR_COMPILE_THREADS=4
mkdir -p "$OUT/logs"
SHIM=/tmp/shim
mkdir -p $SHIM/unipelt-0.0.dist-info
ln -sfn "$PWD/unipelt" $SHIM/unipelt; ln -sfn "$PWD/plugins" $SHIM/unipelt_plugins; ln -sfn "$PWD/kernels" $SHIM/unipelt_kernels
printf 'Metadata-Version: 2.1\nName: unipelt\nVersion: 0.0\n' > $SHIM/unipelt-0.0.dist-info/METADATA
python3 - > $SHIM/unipelt-0.0.dist-info/entry_points.txt <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["unipelt"]
print("[unipelt]"); [print(f"{k} = {v}") for k, v in eps.items()]
PY
# gpu_tests LOGNAME TIMEOUT PYTEST-ARGS...: pytest on the GPU into $OUT/logs/LOGNAME (without
# inductor's DEBUG lines); prints the summary of failures, errors and skips
gpu_tests() {
    local log=$1 t=$2; shift 2
    (timeout "$t" env PYTHONPATH=$SHIM python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short -rfEs "$@" 2>&1 \
        | grep -v DEBUG) > "$OUT/logs/$log"
    sed -n '/short test summary/,$p' "$OUT/logs/$log" | cut -c1-300 | tail -30
}
