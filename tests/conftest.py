import os

import pytest
import torch

from steering.testing import FAMILIES, tiny_model

# 2 (the CI machine's cores); STEERING_TEST_THREADS=1 beside another job, since torch spin-waits
torch.set_num_threads(int(os.environ.get("STEERING_TEST_THREADS", "2")))

# Tests that need the default organisms (built once per machine, ~3 min each from an empty cache)
# or run the notebooks are marked ``organisms``: ``pytest -m "not organisms"`` is the quick suite.
ORGANISM_FIXTURES = {"organisms_llama", "organisms_gpt2", "judge_organism"}


@pytest.fixture(scope="session", autouse=True)
def _own_fingerprint_cache(tmp_path_factory):
    """Fingerprints the tests compute are remembered in a folder of their own, not the user's cache."""
    import steering.weights.files as files

    where = tmp_path_factory.mktemp("fingerprints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files, "_fingerprint_dir", lambda: where)
        yield where


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ORGANISM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.organisms)


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


@pytest.fixture(scope="session")
def judge_organism():
    """The judge organism (a Llama Guard-format classifier; built once per machine, then cached)."""
    from steering import organisms

    return organisms.build_judge(progress=False)
