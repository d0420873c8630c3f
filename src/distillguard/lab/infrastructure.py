"""Infrastructure pools: IP addresses, user agents, payment instruments, e-mail domains.

Address pools are realistic by construction: data-centre addresses are sampled from the
corpus's `ipranges/datacenter_ipv4.txt` when present (built-in cloud ranges otherwise); home
broadband, mobile-carrier CGNAT and university NAT addresses come from ranges of the kind those
networks use. One residential pool is shared by every honest population, so an attacker whose
IP strategy is `residential_shared_with_honest` really does reuse addresses honest users use.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa

#: Built-in public cloud / hosting ranges (AWS, GCP, Azure, DigitalOcean, Hetzner, OVH, Vultr).
BUILTIN_DATACENTER = ["3.0.0.0/9", "34.64.0.0/10", "20.0.0.0/11", "159.89.0.0/16", "5.9.0.0/16",
                      "51.75.0.0/16", "45.76.0.0/15", "52.0.0.0/11", "35.184.0.0/13"]
#: Consumer broadband ranges (large ISPs in the US, EU, India, Japan, Brazil).
RESIDENTIAL = ["24.0.0.0/12", "73.0.0.0/8", "98.192.0.0/10", "71.192.0.0/12", "86.0.0.0/11",
               "90.0.0.0/9", "79.192.0.0/10", "49.32.0.0/11", "126.0.0.0/8", "177.0.0.0/10",
               "82.64.0.0/10", "109.0.0.0/11"]
#: Mobile carriers' public CGNAT egress ranges.
CGNAT = ["172.56.0.0/13", "174.192.0.0/10", "166.170.0.0/16", "117.192.0.0/12", "39.32.0.0/11"]
#: University networks (NAT egress of campus Wi-Fi).
UNIVERSITY = ["128.32.0.0/16", "171.64.0.0/14", "129.105.0.0/16", "131.111.0.0/16",
              "130.225.0.0/16", "128.2.0.0/16", "141.211.0.0/16"]

USER_AGENTS: dict[str, list[str]] = {
    "browser": [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        f"Chrome/{v}.0.0.0 Safari/537.36" for v in (128, 129, 130, 131)
    ] + [
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
        f"Gecko) Version/{v} Safari/605.1.15" for v in ("17.6", "18.0", "18.1")
    ],
    "mobile_app": [f"AssistantApp/{v} (iPhone; iOS {o})" for v in ("5.1.0", "5.2.1")
                   for o in ("17.6", "18.1")]
    + [f"AssistantApp/{v} (Android {o})" for v in ("5.1.0", "5.2.1") for o in ("13", "14")],
    "sdk_python": [f"OpenAI/Python 1.{v}.{p}" for v in (51, 54, 57) for p in (0, 2)]
    + [f"Anthropic/Python 0.{v}.0" for v in (39, 42)],
    "sdk_node": [f"OpenAI/JS 4.{v}.0" for v in (67, 71, 73)] + ["Anthropic/JS 0.32.1"],
    "http": ["python-requests/2.32.3", "python-httpx/0.27.2", "curl/8.5.0", "Go-http-client/2.0",
             "Apache-HttpClient/5.2.1 (Java/17.0.9)"],
    "forge_cli": [f"Forge/{v} ({o})" for v in ("1.4.2", "1.5.0", "1.5.1")
                  for o in ("darwin; arm64", "linux; x86_64", "win32; x64")],
}

CONSUMER_DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me",
                    "hotmail.com", "qq.com", "163.com", "gmx.de", "yandex.ru"]
EDU_DOMAINS = ["berkeley.edu", "stanford.edu", "northwestern.edu", "cam.ac.uk", "ku.dk",
               "cmu.edu", "umich.edu", "tsinghua.edu.cn", "ethz.ch", "u-tokyo.ac.jp"]
_CORP_STEMS = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay", "stark", "wayne",
               "tyrell", "soylent", "cyberdyne", "wonka", "aperture", "massive", "gringotts"]

#: Time-zone offset (hours) -> plausible billing countries.
COUNTRIES = {-8: ["US", "CA"], -5: ["US", "CA"], -3: ["BR", "AR"], 0: ["GB", "PT"],
             1: ["DE", "FR", "NL", "ES"], 2: ["FI", "UA"], 3: ["TR", "SA"], 5.5: ["IN"],
             8: ["SG", "CN", "HK"], 9: ["JP", "KR"], 10: ["AU"]}


def _networks(cidrs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(network address, size) of each IPv4 CIDR; malformed lines are skipped."""
    bases, sizes = [], []
    for cidr in cidrs:
        address, _, prefix = cidr.partition("/")
        octets = address.split(".")
        if len(octets) != 4 or not prefix.isdigit() or not all(o.isdigit() for o in octets):
            continue
        bits = int(prefix)
        if not 0 <= bits <= 30 or any(int(o) > 255 for o in octets):
            continue
        value = int.from_bytes(bytes(int(o) for o in octets), "big")
        bases.append(value & ~((1 << (32 - bits)) - 1) & 0xFFFFFFFF)
        sizes.append(1 << (32 - bits))
    return np.array(bases, dtype=np.int64), np.array(sizes, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _datacenter_ranges(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Data-centre IPv4 ranges from the corpus file (built-in cloud ranges without it)."""
    cidrs = BUILTIN_DATACENTER
    if path is not None and Path(path).is_file():
        lines = [ln.split("#")[0].strip() for ln in Path(path).read_text().splitlines()]
        cidrs = [ln for ln in lines if ln and ":" not in ln] or BUILTIN_DATACENTER
    return _networks(cidrs)


def _format_ipv4(values: np.ndarray) -> list[str]:
    octets = [(values >> s) & 255 for s in (24, 16, 8, 0)]
    return [f"{a}.{b}.{c}.{d}" for a, b, c, d in zip(*(o.tolist() for o in octets), strict=True)]


def sample_addresses(cidrs: tuple[np.ndarray, np.ndarray], count: int,
                     rng: np.random.Generator) -> list[str]:
    """`count` distinct-ish host addresses from the ranges, weighted by range size (capped so
    one huge range does not dominate)."""
    bases, sizes = cidrs
    weights = np.minimum(sizes, 1 << 16).astype(np.float64)
    pick = rng.choice(len(bases), size=count, p=weights / weights.sum())
    offsets = rng.integers(1, np.maximum(sizes[pick] - 1, 2))
    return _format_ipv4(bases[pick] + offsets)


class Infrastructure:
    """Address ranges (from the corpus when available) and the shared residential pool."""

    def __init__(self, corpus: Path | None, residential_pool_size: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 7002])
        dc_file = corpus / "ipranges" / "datacenter_ipv4.txt" if corpus else None
        self.ranges = {
            "datacenter": _datacenter_ranges(str(dc_file) if dc_file else None),
            "residential": _networks(RESIDENTIAL),
            "cgnat": _networks(CGNAT),
            "university": _networks(UNIVERSITY),
        }
        self.residential_pool = sample_addresses(self.ranges["residential"],
                                                 max(residential_pool_size, 16), rng)

    def pool(self, kind: str, size: int, rng: np.random.Generator) -> list[str]:
        """A fresh pool of `size` addresses of `kind` (datacenter, residential, cgnat,
        university)."""
        return sample_addresses(self.ranges[kind], max(size, 1), rng)


def user_agent_pool() -> tuple[pa.Array, dict[str, tuple[int, int]]]:
    """Every user-agent string, and per family its (offset, count) in that array."""
    values, spans = [], {}
    for family, strings in USER_AGENTS.items():
        spans[family] = (len(values), len(strings))
        values.extend(strings)
    return pa.array(values), spans


#: E-mail domain pools per kind (corporate and startup domains are made from name stems).
EMAIL_DOMAINS = {
    "consumer": CONSUMER_DOMAINS,
    "edu": EDU_DOMAINS,
    "corporate": [f"{stem}{suffix}.com" for stem in _CORP_STEMS for suffix in ("", "-corp",
                                                                            "group")],
    "startup": [f"{stem}{suffix}.io" for stem in _CORP_STEMS for suffix in ("ai", "labs", "hq")],
}


def pick_per_kind(kinds: np.ndarray, pools: dict, rng: np.random.Generator) -> pa.Array:
    """For each row, a random member of `pools[kinds[row]]` (vectorised per kind)."""
    out = np.empty(len(kinds), dtype=object)
    for kind in sorted(set(kinds.tolist())):  # sorted: set order varies by process
        rows = np.flatnonzero(kinds == kind)
        pool = np.asarray(pools[kind], dtype=object)
        out[rows] = pool[rng.integers(len(pool), size=len(rows))]
    return pa.array(out.tolist(), pa.string())
