"""torch.compile(fullgraph=True) of the public API: the functional `smooth_infonce` and the module
`SmoothInfoNCELoss`, forward and backward, contiguous and transposed inputs, both backends.

With ``validate=False`` a call reads nothing back from the device, so it traces as one graph; the
Triton backend is one opaque custom op in it (under the interpreter here, on CPU tensors). With
``validate=True`` the value checks read back from the device: a data-dependent guard that
``fullgraph=True`` rejects, and that without it is a graph break (the checks then run eagerly).
"""

import pytest
import torch
import torch.nn.functional as F

from smooth_infonce import SmoothInfoNCELoss, smooth_infonce

BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("triton", id="triton", marks=pytest.mark.interpreter)]


def inputs(contiguous, batch=8, dim=16, seed=0):
    """Two views (B, D) needing gradients, contiguous or transposed views of (D, B) storage."""
    gen = torch.Generator().manual_seed(seed)

    def one():
        x = torch.randn(batch, dim, generator=gen) if contiguous else torch.randn(dim, batch, generator=gen).T
        return x.requires_grad_()

    return one(), one()


def call_forms(backend):
    """The four call forms in one function (one graph to compile): the losses, stacked."""
    options = dict(temperature=0.1, smoothing=0.2, backend=backend, validate=False)
    queue = F.normalize(torch.randn(24, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    ids = torch.arange(8).repeat(2)
    module = SmoothInfoNCELoss(neighbors=2, **options)

    def losses(x0, x1):
        return torch.stack([
            smooth_infonce(torch.cat([x0, x1]), ids=ids, neighbors=2, **options),  # functional, in-batch
            smooth_infonce(x0, queue, positive_keys=x1, **options),  # functional, MoCo
            module(x0, x1),  # module, in-batch
            module(x0, x1, queue=queue),  # module, MoCo
        ])

    return losses


def values_and_grads(fn, x0, x1):
    """The losses and the gradients of a weighted sum of them (distinct weights: an error in one
    form's backward cannot hide in another's)."""
    losses = fn(x0, x1)
    weights = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype)
    return (losses.detach(), *torch.autograd.grad((losses * weights).sum(), (x0, x1)))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_forward_and_backward(backend, contiguous):
    x0, x1 = inputs(contiguous)
    assert x0.is_contiguous() == contiguous
    fn = call_forms(backend)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, expected in zip(values_and_grads(compiled, x0, x1), values_and_grads(fn, x0, x1)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_validate_true_is_a_data_dependent_break():
    """validate=True reads values back (non-finite inputs, counts): fullgraph=True refuses it,
    a plain torch.compile breaks the graph there and still computes the same loss."""
    x0, x1 = inputs(contiguous=True)
    module = SmoothInfoNCELoss(0.1, 0.2, 2, backend="reference")  # validate=True, the default
    torch._dynamo.reset()
    with pytest.raises(Exception, match="data-dependent|Data-dependent|item"):
        torch.compile(lambda a, b: module(a, b), fullgraph=True, backend="aot_eager")(x0, x1)
    torch._dynamo.reset()
    got = torch.compile(lambda a, b: module(a, b), backend="aot_eager")(x0, x1)
    torch.testing.assert_close(got, module(x0, x1))
