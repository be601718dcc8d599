"""redis_url parsing, redaction and the version rule (csc.cluster.redisconn), no server."""

from __future__ import annotations

import pytest

from csc.cluster.redisconn import (
    RedisKind,
    RedisTarget,
    RedisUnavailable,
    check_versions,
    parse_redis_url,
    redacted,
    version_tuple,
)
from shared.config import Secret


def test_plain_server_defaults() -> None:
    target = parse_redis_url("redis://redis.example")
    assert target == RedisTarget(RedisKind.SERVER, (("redis.example", 6379),))
    assert target.describe() == "redis.example:6379"


def test_server_with_credentials_db_and_tls() -> None:
    target = parse_redis_url(
        "rediss://csc:p%40ss%2Fw@10.0.0.5:7000/3?ssl_cert_reqs=optional&ssl_ca_certs=/etc/ca.pem"
    )
    assert target.kind is RedisKind.SERVER and target.tls
    assert target.addresses == (("10.0.0.5", 7000),)
    assert (target.username, target.db) == ("csc", 3)
    assert target.password == Secret("p@ss/w")
    assert (target.ssl_cert_reqs, target.ssl_ca_certs) == ("optional", "/etc/ca.pem")
    assert "p@ss" not in repr(target)
    assert target.describe() == "10.0.0.5:7000 (TLS)"


def test_password_only_and_ipv6() -> None:
    target = parse_redis_url("redis://:secret@[::1]:6380?db=2")
    assert (target.username, target.password, target.db) == (None, Secret("secret"), 2)
    assert target.addresses == (("::1", 6380),)
    assert target.describe() == "[::1]:6380"


def test_unix_socket() -> None:
    target = parse_redis_url("unix://:pw@/run/redis/redis.sock?db=1")
    assert target.kind is RedisKind.UNIX
    assert (target.socket_path, target.db, target.password) == (
        "/run/redis/redis.sock",
        1,
        Secret("pw"),
    )
    assert target.describe() == "socket /run/redis/redis.sock"


def test_sentinel() -> None:
    target = parse_redis_url(
        "redis+sentinel://app:pw@s1:26380,s2,[::1]:26381/4?sentinel_master_name=main"
        "&sentinel_username=watch&sentinel_password=spw"
    )
    assert target.kind is RedisKind.SENTINEL
    assert target.addresses == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (target.master_name, target.db, target.username) == ("main", 4, "app")
    assert (target.sentinel_username, target.sentinel_password) == ("watch", Secret("spw"))
    assert target.describe() == "sentinels s1:26380, s2:26379, [::1]:26381 for master 'main'"


def test_cluster() -> None:
    target = parse_redis_url("redis+cluster://:pw@n1:7000,n2:7001,n3")
    assert target.kind is RedisKind.CLUSTER
    assert target.addresses == (("n1", 7000), ("n2", 7001), ("n3", 6379))
    assert target.describe() == "cluster nodes n1:7000, n2:7001, n3:6379"


def test_secret_url_accepted() -> None:
    assert parse_redis_url(Secret("redis://h:1")).addresses == (("h", 1),)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h", "the scheme must be one of"),
        ("h:6379", "the scheme must be one of"),
        ("redis://", "the host is missing"),
        ("redis://a,b", "several hosts need redis+sentinel://"),
        ("redis://h:0", "the port must be from 1 to 65535"),
        ("redis://h:99999", "the port must be a number from 0 to 65535"),
        ("redis://h/x", "the database must be a number"),
        ("redis://h/1?db=2", "name different databases"),
        ("redis://h?timeout=3", "unknown option 'timeout' (accepted here: db)"),
        ("redis://h?db=1&db=1", "option 'db' is given twice"),
        ("redis://h?ssl_cert_reqs=none", "unknown option 'ssl_cert_reqs'"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("redis://h#frag", "a fragment"),
        ("redis://user@h", "the user info has no password"),
        ("redis://user:@h", "the password after ':' is empty"),
        ("redis://h,,i", "an empty host"),
        ("redis+sentinel://a,,b?sentinel_master_name=m", "an empty host"),
        ("redis+sentinel://a:1,b:2", "add ?sentinel_master_name=NAME"),
        ("redis+sentinel://a,a?sentinel_master_name=m", "listed twice"),
        ("redis+cluster://a/2", "only database 0"),
        ("redis+cluster://a?db=0", "unknown option 'db'"),
        ("unix://", "the socket path is missing"),
        ("unix://host/run/r.sock", "a unix:// URL has no host"),
    ],
)
def test_bad_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=r"^redis_url ") as caught:
        parse_redis_url(url)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:se/cret@h:6379",  # unencoded "/" in the password
        "redis://:se?cret@h:6379",  # unencoded "?"
        "redis://u:sec#ret@h",
        "redis://u:secret@h:notaport",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert "cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:p%40w@h", "rediss://user:***@h"),
        ("redis://onlyword@h", "redis://***@h"),
        ("redis://:a@b@h", "redis://:***@h"),
        (
            "redis+sentinel://u:pw@a:1,b:2/0?sentinel_master_name=m&sentinel_password=spw",
            "redis+sentinel://u:***@a:1,b:2/0?sentinel_master_name=m&sentinel_password=***",
        ),
        ("unix://:pw@/run/r.sock", "unix://:***@/run/r.sock"),
        ("not a url sentinel_password=x", "not a url sentinel_password=***"),
    ],
)
def test_redacted(url: str, shown: str) -> None:
    assert redacted(url) == shown
    assert redacted(Secret(url)) == shown


def test_version_tuple() -> None:
    assert version_tuple("7.0.15") == (7, 0, 15)
    assert version_tuple("7.2") == (7, 2)
    with pytest.raises(ValueError, match="is not a Redis version"):
        version_tuple("7.x")


def test_check_versions_accepts_7_and_newer() -> None:
    check_versions({"a:1": "7.0.0", "b:2": "7.4.1", "c:3": "8.0.2"}, "redis://a:1")


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        ({"a:1": "6.2.14"}, "redis://x: a:1 runs Redis 6.2.14; Redis 7.0 or newer is required"),
        (
            {"a:1": "7.2.0", "b:2": "6.0.9"},
            "redis://x: b:2 runs Redis 6.0.9; Redis 7.0 or newer is required",
        ),
        ({"a:1": "?"}, "a:1 reports an unreadable version '?'"),
        ({}, "named no server"),
    ],
)
def test_check_versions_refuses_old_servers(versions: dict[str, str], expected: str) -> None:
    with pytest.raises(RedisUnavailable) as caught:
        check_versions(versions, "redis://x")
    assert expected in str(caught.value)
