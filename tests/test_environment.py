"""The environment around unipelt (issue 14): the repository's kernels/ folder must not pass for
the PyPI package ``kernels``; bitsandbytes' kernels-hub warning is filtered, and nothing else;
the environment notes the code points to exist."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_folder_does_not_shadow_the_pypi_package_from_the_repository_root():
    """Run from the checkout (the root first on sys.path, as ``python -m`` does): ``import kernels``
    finds the folder, which must look like no package at all to transformers' probe and to
    bitsandbytes' ``from kernels import get_kernel``, while ``unipelt_kernels`` stays importable."""
    code = (
        "import sys; sys.path.insert(0, '')\n"
        "import kernels\n"
        "assert kernels.__file__ is None and list(kernels.__path__) == [], kernels.__file__\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('get_kernel imported from the shadowing folder')\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert is_kernels_available() is False\n"
        "import unipelt_kernels\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_bitsandbytes_kernels_hub_warning_is_filtered_and_nothing_else(caplog):
    import unipelt.models  # noqa: F401 - installs the filter

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        log.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def test_environment_notes_exist_where_the_code_points():
    assert (ROOT / "docs" / "ENVIRONMENT.md").is_file()
    for path in ("pyproject.toml", ".ci/setup", "unipelt/models.py"):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert "docs/ENVIRONMENT.md" in text and "(ENVIRONMENT.md)" not in text, path


def test_importing_the_training_api_prints_no_kernels_hub_warning():
    """Regression: `from unipelt.training import ...` imports transformers' Trainer, which imports
    bitsandbytes, before any model is loaded: the filter must already be installed then."""
    done = subprocess.run([sys.executable, "-c", "import unipelt.training"], cwd=ROOT / "tests", capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr and "pip install kernels" not in done.stderr


_STATIC = "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"


def _static_launch_after_import(cuda: bool, env: dict[str, str]) -> str:
    # a fresh process: the setting is made once, when unipelt_kernels is first imported; CUDA is
    # stood in for by torch.cuda.is_available (the branch a GPU machine takes)
    code = (
        "import torch\n"
        f"torch.cuda.is_available = lambda: {cuda}\n"
        "from torch._inductor import config\n"
        "before = config.static_launch_user_defined_triton_kernels\n"
        "import unipelt_kernels\n"
        "print(before, config.static_launch_user_defined_triton_kernels)\n"
    )
    import os
    full = {k: v for k, v in os.environ.items() if k != _STATIC}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                          timeout=300, env=full)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("\n")[-2]


def test_kernels_package_turns_on_inductors_static_launcher_for_its_kernels_on_cuda():
    """On CUDA, importing unipelt_kernels lets inductor launch user-defined Triton kernels (the
    triton_op twins) through its static launcher (default-mode llama step 30.8 -> 25.9 ms on an
    H200, RESULTS.md); without CUDA nothing changes, and the variable, when set, decides."""
    assert _static_launch_after_import(True, {}) == "False True"
    assert _static_launch_after_import(False, {}) == "False False"
    assert _static_launch_after_import(True, {_STATIC: "0"}) == "False False"
    assert _static_launch_after_import(True, {_STATIC: "1"}) == "True True"
