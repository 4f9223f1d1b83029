import pytest
import torch

from trtfalcon.plugins.gated_norm import gated_rms_norm_ref
from trtfalcon.plugins.ops import get_ops

from plugin_helpers import TOL

TRITON = get_ops("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_groups", [1, 2, 4])
@pytest.mark.parametrize("variant", ["gate-then-norm", "norm-before-gate", "gate-only"])
def test_gated_rms_norm_matches_reference(dtype, out_dtype, n_groups, variant):
    t, d = 5, 48  # group sizes 48, 24, 12: not powers of two
    y, z = torch.randn(t, d).to(dtype), torch.randn(t, d).to(dtype)
    w = None if variant == "gate-only" else torch.randn(d).to(dtype)
    nbg = variant == "norm-before-gate"
    ref = gated_rms_norm_ref(y, z, w, n_groups, 1e-5, nbg, out_dtype)
    out = TRITON.gated_rms_norm(y, z, w, n_groups, 1e-5, nbg, out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16 if torch.bfloat16 in (dtype, out_dtype) else dtype])


def test_gated_rms_norm_7b_width():
    """The 7B: d_ssm 3072, one group, gate first (norm_before_gate false)."""
    y, z = torch.randn(3, 3072, dtype=torch.bfloat16), torch.randn(3, 3072, dtype=torch.bfloat16)
    w = torch.randn(3072, dtype=torch.bfloat16)
    ref = gated_rms_norm_ref(y, z, w, 1, 1e-5, False, torch.bfloat16)
    out = TRITON.gated_rms_norm(y, z, w, 1, 1e-5, False, torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.bfloat16])
