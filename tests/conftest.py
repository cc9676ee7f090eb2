import pytest
import torch

from steering.testing import FAMILIES, tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)
