"""What every integration shares: ``import fxsplit`` needs none of them, and a missing framework names its extra."""

import importlib
import subprocess
import sys

import pytest

import fxsplit


def test_import_fxsplit_imports_no_integration_and_no_framework():
    code = ("import sys, fxsplit; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'transformers', 'tensorboard', 'accelerate') or m.startswith('fxsplit.integrations')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("integration, framework, extra", [
    ("lightning", "lightning.pytorch", "lightning"),
    ("huggingface", "transformers", "huggingface"),
    ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
])
def test_a_missing_framework_is_a_missing_extra_error_naming_the_pip_install(monkeypatch, integration, framework,
                                                                            extra):
    monkeypatch.setitem(sys.modules, framework, None)  # what Python does for a module that is not installed
    monkeypatch.delitem(sys.modules, f"fxsplit.integrations.{integration}", raising=False)
    with pytest.raises(fxsplit.MissingExtraError, match=rf"pip install 'fxsplit\[{extra}\]'") as error:
        importlib.import_module(f"fxsplit.integrations.{integration}")
    assert isinstance(error.value, ImportError) and isinstance(error.value, fxsplit.FxsplitError)
