"""The library API: `mxguard.deliver()` is what programs that send mail directly call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import mxguard
from mxguard import config
from mxguard.engine.deliver import AddressError
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import AttackMode

pytestmark = pytest.mark.lab


def test_deliver_refuses_a_stripped_mta_sts_domain_and_delivers_an_honest_one(
    lab: Lab, tmp_path: Path
) -> None:
    settings = config.load(lab.config_file).with_overrides(store=f"sqlite:///{tmp_path}/s.db")
    lab.set_attack("mx1.sts-enforce.test", AttackMode.STRIP)
    lab.set_attack("mx2.sts-enforce.test", AttackMode.STRIP)
    message = b"Subject: hi\r\n\r\nsecret\r\n"
    result = asyncio.run(
        mxguard.deliver("a@client.test", ["b@sts-enforce.test", "c@dane-ee.test"], message,
                        settings=settings)
    )  # fmt: skip
    by_domain = {d.domain: d for d in result.domains}
    assert by_domain["sts-enforce.test"].status == "deferred"
    assert by_domain["dane-ee.test"].status == "delivered"
    assert result.exit_code == 75  # the worst outcome decides
    assert [m.tls for m in lab.receiver("mx.dane-ee.test").messages] == [True]


def test_a_sender_that_is_not_an_address_is_an_address_error_before_any_connection(
    lab: Lab, tmp_path: Path
) -> None:
    settings = config.load(lab.config_file).with_overrides(store=f"sqlite:///{tmp_path}/s.db")
    with pytest.raises(AddressError, match=r"^sender address: address .* contains CR, LF") as e:
        asyncio.run(mxguard.deliver("a@client.test\r\nRCPT TO:<x@y.test>", ["b@nopolicy.test"],
                                    b"Subject: hi\r\n\r\nhi\r\n", settings=settings))  # fmt: skip
    assert isinstance(e.value, ValueError) and e.value.address.startswith("a@client.test\r\n")
    assert lab.attacker("mx.nopolicy.test").sessions == []
