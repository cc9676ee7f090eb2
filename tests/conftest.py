import pytest
import torch

from steering.testing import FAMILIES, tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def organisms_llama():
    """The default Llama organisms (built once per machine, then cached)."""
    from steering import organisms

    return organisms.build(arch="llama")


@pytest.fixture(scope="session")
def organisms_gpt2():
    from steering import organisms

    return organisms.build(arch="gpt2")
