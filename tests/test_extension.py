"""The native extension is optional: without ``_C`` the loader warns once, the CPU backend is reported
not live, ``auto`` falls back to the chunked PyTorch path and the API still works; and
``python -m posttrain_kernels info`` reports what is live."""
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import posttrain_kernels as ptk
from posttrain_kernels import _extension, dispatch
from posttrain_kernels.reference import cross_entropy_reference, token_logprobs_reference

CPU = torch.device("cpu")


@pytest.fixture
def missing_extension(monkeypatch):
    """``posttrain_kernels._C`` fails to import; the loader starts from scratch. monkeypatch
    restores the real state (loaded module included) afterwards."""
    real_import = _extension.importlib.import_module
    calls = []

    def fake_import(name, *args, **kwargs):
        if name == "posttrain_kernels._C":
            calls.append(name)
            raise ImportError("No module named 'posttrain_kernels._C' (simulated)")
        return real_import(name, *args, **kwargs)

    # only the importlib seen by _extension: dispatch's own import_module("triton") is untouched
    monkeypatch.setattr(_extension, "importlib", types.SimpleNamespace(import_module=fake_import))
    monkeypatch.setattr(_extension, "_state", {"loaded": False, "module": None, "error": None})
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return calls


def test_missing_extension_degrades_gracefully(missing_extension):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.load_extension() is None
        assert _extension.load_extension() is None
        assert not _extension.has_cpu_kernels()
        assert not _extension.has_cuda_kernels()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "_C is not available" in str(runtime[0].message)
    assert "simulated" in str(runtime[0].message)
    assert missing_extension == ["posttrain_kernels._C"], "the import must be tried only once"
    assert isinstance(_extension.extension_error(), ImportError)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning from anything below
        live = dispatch.live_backends()
        assert live["cpu"] is False and live["cuda"] is False
        assert live["torch"] is True and live["reference"] is True
        assert dispatch.resolve_backend("auto", CPU) == "torch"
        assert ptk.live_backends() == live

        torch.manual_seed(0)
        logits = torch.randn(6, 11, requires_grad=True)
        labels = torch.randint(0, 11, (6,))
        labels[2] = -100
        logp, ent = ptk.token_logprobs(logits, labels, return_entropy=True)
        lr, hr = token_logprobs_reference(logits.detach(), labels, 1.0, -100, True)
        torch.testing.assert_close(logp, lr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, hr, atol=1e-5, rtol=1e-5)
        (logp.sum() + ent.sum()).backward()
        assert logits.grad is not None and (logits.grad[2] == 0).all()
        loss = ptk.cross_entropy(logits.detach(), labels)
        torch.testing.assert_close(loss, cross_entropy_reference(logits.detach(), labels), atol=1e-5, rtol=1e-5)


def test_explicit_cpu_backend_without_extension_says_why(missing_extension):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logits, labels = torch.randn(3, 5), torch.randint(0, 5, (3,))
        with pytest.raises(RuntimeError, match=r"backend='cpu' needs the native extension"):
            ptk.token_logprobs(logits, labels, backend="cpu")


def test_state_restored_after_simulation():
    # runs after the tests above: monkeypatch put the real loader state back
    ext = _extension.load_extension()
    try:
        import posttrain_kernels._C as real  # noqa: F401
    except ImportError:
        pytest.skip("_C not built here")
    assert ext is real
    assert dispatch.live_backends()["cpu"] == bool(getattr(real, "has_cpu", False))


def test_cli_info():
    env = dict(os.environ)
    env.pop(dispatch.ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-m", "posttrain_kernels", "info"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {}
    for line in lines:
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    assert rows.get("torch") == torch.__version__, proc.stdout
    assert rows.get("posttrain_kernels") == ptk.__version__, proc.stdout
    live_line = [line for line in lines if line.startswith("backends live")]
    assert len(live_line) == 1, proc.stdout
    live = [b.strip() for b in live_line[0][len("backends live"):].split(",")]
    assert "reference" in live and "torch" in live
    assert ("cpu" in live) == dispatch.live_backends()["cpu"]
    assert rows.get("auto on cpu") in ("cpu", "torch")
