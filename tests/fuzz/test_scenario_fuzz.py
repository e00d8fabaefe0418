"""The scenario loader on malformed input: a ScenarioError that names the key, never a traceback.

Three properties, each starting from the shipped scenarios (and a minimal one):

* ``from_dict`` on tables with 1-3 edits: any value (wrong types, NaN/inf, huge and
  64-bit-boundary integers, datetimes, nested arrays and tables) set at any key of any
  level (top, sections, roles, the free-form ``params``/``attack_params``/``schedule``),
  unknown keys at every level, deleted keys, sections and roles that are not tables;
* ``load`` on mutated TOML text (bytes flipped, inserted, deleted, lines duplicated or
  cut, invalid UTF-8, NUL, deep nesting, 5000-digit integers, appended snippets);
* ``load`` with random ``--set`` overrides.

Either a Scenario comes back, or a ScenarioError whose message names the edited key
(for an unknown key or a value of the wrong type: that exact key; otherwise some key of
the scenario) or says the TOML is invalid. Any other exception fails the case.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import re
import time
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, strategies as st

from orchestrator.scenario import RoleSection, Scenario, ScenarioError, from_dict, load

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "scenarios").glob("*.toml"))
MINIMAL = {"name": "mini", "seed": 0, "model": {"name": "logreg"}, "data": {"dataset": "digits"},
           "federation": {"rounds": 2}, "roles": [{"name": "h", "count": 2}], "output": {"live": False, "plot": False}}
BASES = [tomllib.loads(p.read_text()) for p in SHIPPED] + [MINIMAL]
HINTS = typing.get_type_hints(Scenario)
SECTIONS = {name: typing.get_type_hints(tp) for name, tp in HINTS.items() if dataclasses.is_dataclass(tp)}
ROLE_HINTS = typing.get_type_hints(RoleSection)
TOP = tuple(HINTS)
KEY_WORDS = re.compile(r"\b(" + "|".join(map(re.escape, TOP)) + r")\b")
SLOW = 5.0
"""A load that takes longer than this (seconds) fails: loading must not hang on a huge value."""

# ----- values --------------------------------------------------------------------------------------
EDGE_INTS = st.sampled_from([0, 1, -1, 2, 3, 10, 100, (1 << 31) - 1, 1 << 31, (1 << 53) + 1, (1 << 63) - 1, 1 << 63,
                             -(1 << 63), -(1 << 63) - 1, 1 << 64, 10 ** 30, -10 ** 30, 10 ** 400, -10 ** 400])
EDGE_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, 1.0, 1e308, -1e308, 5e-324, 1e-300])
INTS = st.one_of(EDGE_INTS, st.integers(-1000, 1000), st.integers())
FLOATS = st.one_of(EDGE_FLOATS, st.floats(allow_nan=True, allow_infinity=True))
TEXTS = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "cnn", "CNN", "mean", "median", "sample", "all",
                                                         "sync", "async", "honest", "a/b", "..", "\x00", "x" * 5000]))
SCALARS = st.one_of(INTS, FLOATS, TEXTS, st.booleans(), st.datetimes(), st.dates(), st.times(),
                    st.datetimes(timezones=st.just(dt.timezone.utc)))
VALUES = st.one_of(EDGE_INTS, EDGE_FLOATS, st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8))
KEYS = st.one_of(st.text(max_size=10), st.sampled_from(["Name", "rounds ", "", " ", "roles", "params", "count", "0"]))


def deep(n: int) -> Any:
    v: Any = 1
    for i in range(n):
        v = [v] if i % 2 else {"k": v}
    return v


def mismatched(value: Any, tp: Any) -> bool:
    """Whether ``value`` is not of the field's type at all (so that key must be the one named)."""
    if typing.get_origin(tp) is Literal:
        return not any(type(value) is type(a) and value == a for a in typing.get_args(tp))
    if tp is bool:
        return not isinstance(value, bool)
    if tp is int:
        return isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < 1 << 63
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        try:
            return not math.isfinite(float(value))
        except OverflowError:
            return True
    if tp is str:
        return not isinstance(value, str)
    if tp is dict:
        return not isinstance(value, dict)
    return False


# ----- edits of a raw scenario ---------------------------------------------------------------------------
@st.composite
def edited(draw) -> tuple[dict, list[tuple[str, str]]]:
    """A shipped (or the minimal) scenario's table with 1-3 edits; each edit is
    ``(kind, key)``: ``unknown`` / ``type`` (the key must be named), else ``other``."""
    raw = copy.deepcopy(draw(st.sampled_from(BASES), label="base"))
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "section", "section", "section", "role", "role", "free", "shape"]))
        if where == "top":
            key = draw(st.sampled_from(["name", "seed"]))
            value = draw(st.one_of(VALUES, st.sampled_from(["a/b", "..", "", "x" * 300, -1, 1 << 63])))
            raw[key] = value
            edits.append(("type" if mismatched(value, HINTS[key]) else "other", key))
        elif where == "section":
            sec = draw(st.sampled_from(sorted(SECTIONS)))
            table = raw.setdefault(sec, {})
            if not isinstance(table, dict):
                continue
            if draw(st.integers(0, 4)) == 0:
                key = draw(KEYS.filter(lambda k: k not in SECTIONS[sec]))
                table[key] = draw(VALUES)
                edits.append(("unknown", f"{sec}.{key}"))
            else:
                key = draw(st.sampled_from(sorted(SECTIONS[sec])))
                value = draw(VALUES)
                table[key] = value
                edits.append(("type" if mismatched(value, SECTIONS[sec][key]) else "other", f"{sec}.{key}"))
        elif where == "role":
            roles = raw.get("roles")
            if not isinstance(roles, list) or not roles or not isinstance(roles[0], dict):
                continue
            i = draw(st.integers(0, len(roles) - 1))
            if not isinstance(roles[i], dict):
                continue
            if draw(st.integers(0, 4)) == 0:
                key = draw(KEYS.filter(lambda k: k not in ROLE_HINTS))
                roles[i][key] = draw(VALUES)
                edits.append(("unknown", f"roles[{i}].{key}"))
            else:
                key = draw(st.sampled_from(sorted(ROLE_HINTS)))
                value = draw(st.one_of(VALUES, st.sampled_from([0, -1, 10 ** 6, 1 << 62]) if key == "count" else VALUES))
                roles[i][key] = value
                edits.append(("type" if mismatched(value, ROLE_HINTS[key]) else "other", f"roles[{i}].{key}"))
        elif where == "free":  # inside params, attack_params, schedule
            spot = draw(st.sampled_from(["defense.params", "training.params", "role.attack_params", "role.schedule"]))
            if spot.startswith("role"):
                roles = raw.get("roles")
                if not isinstance(roles, list) or not roles or not isinstance(roles[-1], dict):
                    continue
                table, name = roles[-1].setdefault(spot[5:], {}), f"roles[{len(roles) - 1}]"
            else:
                sec, key = spot.split(".")
                parent = raw.setdefault(sec, {})
                if not isinstance(parent, dict):
                    continue
                table, name = parent.setdefault(key, {}), sec
            if not isinstance(table, dict):
                continue
            key = draw(st.one_of(KEYS, st.sampled_from(["mu", "beta", "tau", "factor", "lam", "start_round",
                                                         "probability", "period_on", "z", "f"])))
            table[key] = draw(st.one_of(VALUES, st.integers(0, 40).map(deep)))
            edits.append(("other", name))
        else:  # a section or the roles as something else, or an odd roles array
            what = draw(st.sampled_from(["section", "roles", "role_item", "many_roles", "drop"]))
            if what == "section":
                sec = draw(st.sampled_from(sorted(SECTIONS)))
                raw[sec] = draw(st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.lists(st.just({}), max_size=2)))
                edits.append(("type", sec))
            elif what == "roles":
                raw["roles"] = draw(st.one_of(SCALARS, st.just([]), st.just({}), st.just([[{"name": "h", "count": 1}]]),
                                              st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)))
                edits.append(("type", "roles"))
            elif what == "role_item" and isinstance(raw.get("roles"), list):
                raw["roles"].append(draw(st.one_of(SCALARS, st.lists(SCALARS, max_size=2),
                                                   st.lists(st.just({"name": "x"}), max_size=2))))
                edits.append(("type", f"roles[{len(raw['roles']) - 1}]"))
            elif what == "many_roles":
                n = draw(st.integers(2, 60))
                raw["roles"] = [{"name": draw(st.sampled_from(["a", f"r{i}"])), "count": 1} for i in range(n)]
                edits.append(("other", "roles"))
            else:
                sec = draw(st.sampled_from(sorted(raw)))
                del raw[sec]
                edits.append(("other", sec))
    return raw, edits


def check_loader(fn, what: str, must_name: tuple[str, ...] = (), invalid_toml_ok: bool = False,
                 override_ok: bool = False, must_refuse: bool = False) -> None:
    """Run ``fn()``: a Scenario (unless ``must_refuse``), or a ScenarioError naming a key
    (``must_name``: one of those exactly), saying the TOML is invalid (``invalid_toml_ok``)
    or quoting the bad override (``override_ok``); any other exception fails."""
    t0 = time.monotonic()
    try:
        s = fn()
    except ScenarioError as e:
        msg = str(e)
        assert msg.strip(), f"{what}: an empty ScenarioError"
        assert len(msg) < 4000, f"{what}: a {len(msg)}-character message (an unbounded echo?): {msg[:200]}..."
        if invalid_toml_ok and ("not valid TOML" in msg or "cannot be read" in msg):
            return
        if override_ok and msg.startswith("override "):
            return
        if must_name:
            assert any(k in msg or repr(k)[1:-1] in msg for k in must_name), \
                f"{what}: the message does not name {must_name}: {msg}"
        else:
            assert KEY_WORDS.search(msg), f"{what}: the message names no key: {msg}"
    except Exception as e:  # the property: nothing but ScenarioError
        raise AssertionError(f"{what}: {type(e).__name__} instead of ScenarioError: {e}") from e
    else:
        assert isinstance(s, Scenario)
        assert not must_refuse, f"{what}: accepted"
    finally:
        took = time.monotonic() - t0
        assert took < SLOW, f"{what}: loading took {took:.1f} s"


def test_from_dict_edits(budget):
    @budget.seeded
    @budget.settings(800)
    @given(case=edited())
    def prop(case):
        raw, edits = case
        named = tuple(k for kind, k in edits if kind in ("unknown", "type"))
        # (with several edits the first one checked is named: any of the exact keys; else a key of the scenario)
        single = len(edits) == 1
        check_loader(lambda: from_dict(raw), f"edits {edits}", must_name=named if single else (),
                     must_refuse=single and bool(named))

    prop()


# ----- TOML text --------------------------------------------------------------------------------------------
SNIPPETS = [b"\n[federation]\nrounds = 1e999\n", b"\nseed = " + b"9" * 5000 + b"\n", b"\nx = " + b"[" * 3000 + b"]" * 3000,
            b"\ny = " + b"{a=" * 2000 + b"1" + b"}" * 2000, b"\n[[roles]]\nname = 'r'\ncount = 99999999999999999999\n",
            b"\n[model]\nname = \"\xff\xfe\"\n", b"\n\x00\n", b"\n[roles]\nname = 'x'\n", b"\n[[federation]]\n",
            b"\nname = 1979-05-27\n", b"\n[defense.params]\nbeta = nan\n", b"\n[[roles]]\n[roles.schedule]\np = inf\n",
            b"\n[output]\ndir = '\\u0000'\n", b"\n[federation]\nround_timeout = -inf\n", b"\xef\xbb\xbf",
            b"\n[data]\nalpha = 1e-400\n", b"\n[training]\nparams = { mu = " + b"1" * 400 + b".0 }\n"]


@st.composite
def toml_texts(draw) -> tuple[bytes, str]:
    base = draw(st.sampled_from([p.read_bytes() for p in SHIPPED]))
    b, why = bytearray(base), []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup_line", "snippet", "snippet"]))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            b[i:i] = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                    st.sampled_from([b"=", b"[", b"]", b"\"", b"'", b"\n", b"{", b"}", b".", b"#"])))
        elif op == "delete":
            del b[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del b[i:]
        elif op == "dup_line":
            lines = bytes(b).split(b"\n")
            j = i % max(1, len(lines))
            lines.insert(j, lines[j] if lines else b"")
            b = bytearray(b"\n".join(lines))
        else:
            s = draw(st.sampled_from(SNIPPETS))
            b[len(b) if s != b"\xef\xbb\xbf" else 0:len(b) if s != b"\xef\xbb\xbf" else 0] = s
        why.append(f"{op}@{i}")
    return bytes(b), ", ".join(why)


def test_load_mutated_toml(budget, tmp_path):
    path = tmp_path / "fuzzed.toml"

    @budget.seeded
    @budget.settings(300)
    @given(case=toml_texts())
    def prop(case):
        text, why = case
        path.write_bytes(text)
        check_loader(lambda: load(path), f"TOML edited by {why}", invalid_toml_ok=True)

    prop()


def test_load_special_files(tmp_path):
    """A missing file, a directory, an empty file, and each snippet alone."""
    check_loader(lambda: load(tmp_path / "missing.toml"), "a missing file", must_name=("does not exist",))
    check_loader(lambda: load(tmp_path), "a directory", invalid_toml_ok=True)
    for i, s in enumerate([b"", *SNIPPETS]):
        p = tmp_path / f"s{i}.toml"
        p.write_bytes(s)
        check_loader(lambda: load(p), f"the file {s[:40]!r}", invalid_toml_ok=True)


# ----- --set overrides ----------------------------------------------------------------------------------------
OVERRIDE_KEYS = st.one_of(
    st.sampled_from(["name", "seed", "roles", "roles.0.count", "roles[0].count", "model", "model.name.x", "name.x", "",
                     ".", "federation.", ".rounds", "federation..rounds", "federation.rounds.x", "defense.params.beta",
                     "training.params.mu", " federation.rounds ", "federation . rounds"]),
    st.sampled_from(sorted(SECTIONS)).flatmap(lambda s: st.sampled_from(sorted(SECTIONS[s])).map(lambda k: f"{s}.{k}")),
    st.text(max_size=12))
OVERRIDE_VALUES = st.one_of(
    st.sampled_from(["1", "-1", "0", "1e999", "nan", "inf", "-inf", "9" * 5000, "[" * 3000, "{a=" * 2000, "true", "'x'",
                     '"', "'", "[1, 2]", "{ a = 1 }", "1\nx = 2", "1979-05-27", "", " ", "= =", "\x00", "\"\\ud800\"",
                     "18446744073709551616", "-9223372036854775809", "0x7fffffffffffffff", "1_000"]),
    st.text(max_size=12))


def test_load_with_overrides(budget, tmp_path):
    path = tmp_path / "base.toml"
    path.write_bytes((ROOT / "scenarios" / "demo.toml").read_bytes())

    @budget.seeded
    @budget.settings(300)
    @given(sets=st.lists(st.tuples(OVERRIDE_KEYS, OVERRIDE_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
                         min_size=1, max_size=3))
    def prop(sets):
        check_loader(lambda: load(path, sets), f"--set {sets}", override_ok=True)

    prop()


# ----- the cases these properties found (each once, by name) ---------------------------------------------
def _file(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "case.toml"
    p.write_bytes(data)
    return p


FOUND = {
    "huge int for a float": (lambda tp: from_dict({**MINIMAL, "federation": {"round_timeout": 10 ** 400}}),
                             "federation.round_timeout"),
    "int past 64 bits": (lambda tp: from_dict({**MINIMAL, "federation": {"rounds": 1 << 64}}), "federation.rounds"),
    "negative seed": (lambda tp: from_dict({**MINIMAL, "seed": -1}), "seed"),
    "huge int in params": (lambda tp: from_dict({**MINIMAL, "defense": {"name": "mean", "params": {"x": 10 ** 30}}}),
                           "defense.params.x"),
    "deep params": (lambda tp: from_dict({**MINIMAL, "training": {"params": {"mu": deep(40)}}}), "training.params"),
    "5000-digit int in an error": (lambda tp: from_dict({**MINIMAL, "name": 10 ** 5000}), "name"),
    "name with a path": (lambda tp: from_dict({**MINIMAL, "name": "../x"}), "name"),
    "not a table": (lambda tp: from_dict([1]), "table"),
    "roles by --set": (lambda tp: load(_file(tp, b"[[roles]]\nname='h'\ncount=2\n"), ["roles=[{name='x', count=1}]"]),
                       "roles"),
    "--set huge int": (lambda tp: load(_file(tp, b"[[roles]]\nname='h'\ncount=2\n"), ["seed=" + "9" * 5000]), "seed"),
    "--set deep": (lambda tp: load(_file(tp, b"[[roles]]\nname='h'\ncount=2\n"), ["seed=" + "[" * 3000]), "seed"),
    "--set two values": (lambda tp: load(_file(tp, b"[[roles]]\nname='h'\ncount=2\n"), ["seed=1\nname='x'"]), "seed"),
    "not UTF-8": (lambda tp: load(_file(tp, b"name = '\xff'\n")), "not valid TOML"),
    "5000-digit literal": (lambda tp: load(_file(tp, b"seed = " + b"9" * 5000)), "not valid TOML"),
    "deep arrays": (lambda tp: load(_file(tp, b"x = " + b"[" * 3000 + b"]" * 3000)), "not valid TOML"),
    "a directory": (lambda tp: load(tp), "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_found_cases_are_scenario_errors(case, tmp_path):
    fn, words = FOUND[case]
    with pytest.raises(ScenarioError, match=re.escape(words)):
        fn(tmp_path)
