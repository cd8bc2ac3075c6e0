"""Fetch's admission settings: which changes admit more rows, and which earlier drops they may cure."""

from __future__ import annotations

import pytest

from curate.fetch import reasons
from curate.fetch.admission import ADMISSION_PARAMS, readmitted
from curate.fetch.config import FetchParams
from curate.fetch.stage import FetchStage


def admission(**changes) -> dict:
    return FetchStage(FetchParams(**changes)).admission()


def test_the_same_settings_admit_nothing_new():
    assert readmitted(admission(), admission()) == frozenset()
    assert set(admission()) == ADMISSION_PARAMS


@pytest.mark.parametrize("before, after, cured", [
    ({}, {"allow_private_addresses": True}, {reasons.BLOCKED_ADDRESS}),
    ({}, {"max_bytes": 64 * 1024 * 1024}, {reasons.TOO_LARGE}),
    ({}, {"max_redirects": 10}, {reasons.TOO_MANY_REDIRECTS}),
    ({}, {"max_pixels": 200_000_000}, {"decompression_bomb"}),
    ({}, {"respect_robots": False}, {reasons.ROBOTS, reasons.ROBOTS_UNREACHABLE}),
    ({}, {"opt_out_directives": ["noai"]}, {reasons.OPT_OUT}),
    ({}, {"host_max_failures": 0}, {reasons.HOST_UNREACHABLE}),
    ({}, {"host_failure_cooldown": 10.0}, {reasons.HOST_UNREACHABLE}),
    ({}, {"retries": 5}, set(reasons.RETRYABLE)),
    ({}, {"read_timeout": 60.0}, set(reasons.RETRYABLE)),
    ({"retries": 5}, {"retries": 1}, set(reasons.RETRYABLE)),  # effort: fetched rows stay fetched either way
    ({}, {"resolve": {"images.example": "203.0.113.7"}},
     {reasons.DNS_ERROR, reasons.BLOCKED_ADDRESS} | set(reasons.RETRYABLE)),
])
def test_a_setting_that_admits_more_cures_its_own_drops(before, after, cured):
    assert readmitted(admission(**before), admission(**after)) == frozenset(cured)


@pytest.mark.parametrize("before, after", [
    ({"allow_private_addresses": True}, {}),  # a stricter guard
    ({"max_bytes": 64 * 1024 * 1024}, {}),  # a smaller limit
    ({"respect_robots": False}, {}),
    ({"opt_out_directives": ["noai"]}, {}),  # more directives honoured
    ({"resolve": {"images.example": "203.0.113.7"}}, {"resolve": {"images.example": "203.0.113.8"}}),  # a pin moved
    ({"host_max_failures": 0}, {"host_max_failures": 3}),
])
def test_a_setting_that_admits_fewer_fetches_everything_again(before, after):
    assert readmitted(admission(**before), admission(**after)) is None


def test_an_older_record_without_a_setting_fetches_everything_again():
    old = admission()
    del old["retries"]
    assert readmitted(old, admission()) is None


def test_admission_and_speed_settings_leave_the_fingerprint_and_resize_does_not():
    base = FetchStage(FetchParams()).fingerprint()
    assert FetchStage(FetchParams(allow_private_addresses=True, threads=4)).fingerprint() == base
    assert FetchStage(FetchParams(resize={"size": 256})).fingerprint() != base
    assert FetchStage(FetchParams(user_agent="other/1.0")).fingerprint() != base  # robots answers may differ
