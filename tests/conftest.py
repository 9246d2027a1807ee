"""Session-wide test set-up."""

import os

# Triton picks interpreter or compiler when a function is decorated, and decorates its own standard library
# (tl.sum, tl.sigmoid, ...) when triton.language is first imported, which any test module may do indirectly (torch's
# FlexAttention imports it). Set before anything imports Triton, so every kernel the tests call runs under the CPU
# interpreter; production dispatch takes only CUDA tensors, so the other tests keep running the PyTorch paths.
os.environ["TRITON_INTERPRET"] = "1"

# DeepSpeed's logger binds a StreamHandler to whatever sys.stdout is when deepspeed is first imported. Imported
# inside a test that uses capsys, that is the test's capture buffer, closed afterwards, and every later DeepSpeed log
# line becomes a "--- Logging error ---" traceback on stderr (breaking tests that check a one-line error). Importing
# it here binds the handler to the session's stream instead.
import deepspeed  # noqa: E402, F401
import pytest  # noqa: E402

from process_group import process_state_restored  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _process_state_per_module():
    """Every module starts with no process group and no launch variables left by the modules before it."""
    with process_state_restored():
        yield
