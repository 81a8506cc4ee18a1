"""The master's check of submitted environments: each user's run of equal ones is checked and hashed once."""

import pytest

from zmgpu.master.requests import Environments, RequestError
from zmgpu.master.store import env_id
from zmgpu.protocol import ErrorCode

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/alice", "LANG": "C.UTF-8"}


def test_an_equal_environment_is_the_same_checked_one():
    envs = Environments(max_bytes=4096)
    first = envs.checked("alice", dict(ENV))
    again = envs.checked("alice", dict(reversed(ENV.items())))
    assert again is first and first.env_id == env_id(ENV)
    # Another user's equal environment hashes the same, and is checked on its own.
    bobs = envs.checked("bob", dict(ENV))
    assert bobs is not first and bobs.env_id == first.env_id


@pytest.mark.parametrize("bad", [None, ["PATH=/bin"], {"PATH": 5}, {7: "x"}])
def test_a_malformed_environment_is_refused_after_a_good_one(bad):
    envs = Environments(max_bytes=4096)
    first = envs.checked("alice", dict(ENV))
    with pytest.raises(ValueError, match="must map names to strings"):
        envs.checked("alice", bad)
    # What was refused did not replace what the user last had accepted: that one is still the checked one.
    assert envs.checked("alice", dict(ENV)) is first


def test_an_environment_over_the_limit_is_too_large():
    envs = Environments(max_bytes=64)
    with pytest.raises(RequestError) as caught:
        envs.checked("alice", {**ENV, "BIG": "x" * 64})
    assert caught.value.code is ErrorCode.TOO_LARGE and "max_env_bytes" in str(caught.value)
