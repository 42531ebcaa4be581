import pytest
import torch

from biaslab import make_pair

torch.set_default_dtype(torch.float64)


@pytest.fixture(
    params=[("tabular", 3, 3, 0), ("tabular", 2, 4, 1), ("neural", 3, 3, 2), ("neural", 2, 4, 3)],
    ids=lambda p: f"{p[0]}-V{p[1]}-T{p[2]}-s{p[3]}",
)
def pair(request):
    model, V, T, seed = request.param
    return make_pair(model, V, T, seed=seed, kl_scale=0.8)
