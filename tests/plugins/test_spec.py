"""The declaration framework: the generic binder follows the reference's signature and the attributes' declarations."""

import dataclasses

import pytest
import torch

from trtfalcon.plugins.ops import OPS
from trtfalcon.plugins.ssd import SSD


def test_a_reference_parameter_nothing_carries_is_refused():
    """Every reference parameter must be an input or an attribute's source, and nothing else may be: a renamed
    parameter is caught when the declaration is made, not as a wrong kernel argument later."""
    with pytest.raises(TypeError, match=r"parameters \['dt_limit'\] are neither inputs nor attributes"):
        dataclasses.replace(SSD, attributes=SSD.attributes[:1])
    renamed = dataclasses.replace(SSD.attributes[0], name="chunk", param=None)
    with pytest.raises(TypeError, match=r"\['chunk'\] are not its parameters"):
        dataclasses.replace(SSD, attributes=(renamed,) + SSD.attributes[1:])


def test_bind_fills_the_references_defaults_and_converts_attributes():
    t = torch.zeros(1)
    tensors, attrs = SSD.bind(t, t, t, t, t, None, t, t, t, t, t, 64.0)
    assert tensors["D"] is None and tensors["x"] is t
    assert attrs == dict(chunk_size=64, dt_min=0.0, dt_max=float("inf")) and type(attrs["chunk_size"]) is int
    _, attrs = OPS["gated_rms_norm"].bind(t, t, None, 2, 1e-6, 1, torch.float16)
    assert attrs == dict(n_groups=2, eps=1e-6, norm_before_gate=True, has_norm=False, out_dtype="float16")
    _, attrs = OPS["paged_attention"].bind(t, t, t, t, t, t, t)
    assert attrs == dict(scale=0.0)
    with pytest.raises(ValueError, match="k_scale and v_scale go together"):
        OPS["paged_attention"].bind(t, t, t, t, t, t, t, 0.5, torch.ones(()))
