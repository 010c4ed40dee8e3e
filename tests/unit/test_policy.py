"""The call layer's policy (netstack.policy): Qubes' syntax in a documented subset, first
match wins across files in name order, default deny, one-line errors naming FILE:LINE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netstack import config, policy
from netstack.errors import ConfigError
from netstack.kinds.registry import SPECS
from netstack.policy import QubeFacts, evaluate, parse_text

QUBES = {"work": QubeFacts(frozenset({"work"})),
         "personal": QubeFacts(frozenset({"home"})),
         "vault": QubeFacts(frozenset({"secret"}), default_dispvm="work"),
         "disp7": QubeFacts(type="DispVM")}


def pol(text: str) -> policy.Policy:
    return policy.Policy(tuple(parse_text(text, "t.policy")))


def verdict(text: str, src: str, dst: str, svc: str = "qubes.Filecopy", arg: str = ""
            ) -> policy.Verdict:
    return evaluate(pol(text), src, dst, svc, arg, QUBES)


def err(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_text(text, "30-user.policy")
    return str(e.value)


# --- matching --------------------------------------------------------------------------

def test_empty_policy_denies():
    v = verdict("", "work", "personal")
    assert v.action == "deny" and v.rule is None and "default deny" in v.reason


def test_first_match_wins():
    text = ("qubes.Filecopy * work personal deny\n"
            "qubes.Filecopy * @anyvm @anyvm allow\n")
    assert verdict(text, "work", "personal").action == "deny"
    assert verdict(text, "work", "personal").rule == "t.policy:1"
    v = verdict(text, "personal", "work")
    assert (v.action, v.target, v.rule) == ("allow", "work", "t.policy:2")


def test_notify_and_autostart_follow_qubes_defaults():
    """A denied call is told unless its line says notify=no (a call no line matches too);
    an allowed or asked one only with notify=yes; autostart is on unless a line says
    no (then a call that needs a new disposable is refused by the call layer)."""
    assert verdict("", "work", "personal").notify
    text = ("qubes.Filecopy * work personal deny notify=no\n"
            "qubes.Filecopy * personal work deny\n"
            "qubes.OpenInVM * work @dispvm allow notify=yes autostart=no\n"
            "qubes.OpenInVM * personal @dispvm ask\n"
            "qubes.Filecopy * vault work allow\n")
    assert not verdict(text, "work", "personal").notify
    assert verdict(text, "personal", "work").notify
    v = verdict(text, "work", "@dispvm", "qubes.OpenInVM")
    assert (v.action, v.notify, v.autostart) == ("allow", True, False)
    v = verdict(text, "personal", "@dispvm", "qubes.OpenInVM")
    assert (v.action, v.notify, v.autostart) == ("ask", False, True)
    v = verdict(text, "vault", "work")
    assert (v.action, v.notify, v.autostart) == ("allow", False, True)
    assert "notify='maybe'" in err("qubes.Filecopy * @anyvm @anyvm allow notify=maybe\n")


def test_service_and_argument():
    text = ("my.Svc +a work personal allow\n"
            "my.Svc + work personal ask\n"
            "my.Svc * work personal deny\n")
    assert verdict(text, "work", "personal", "my.Svc", "a").action == "allow"
    assert verdict(text, "work", "personal", "my.Svc", "").action == "ask"
    assert verdict(text, "work", "personal", "my.Svc", "b").action == "deny"
    assert verdict(text, "work", "personal", "other.Svc").rule is None


def test_tags_and_types():
    text = ("* * @tag:work @tag:home allow\n"
            "* * @type:DispVM @anyvm allow\n")
    assert verdict(text, "work", "personal").action == "allow"
    assert verdict(text, "personal", "work").action == "deny"
    assert verdict(text, "disp7", "vault").action == "allow"
    assert verdict(text, "vault", "disp7").action == "deny"


def test_default_needs_a_target():
    assert verdict("* * work @default allow\n", "work", "@default").action == "deny"
    v = verdict("* * work @default allow target=personal\n", "work", "@default")
    assert (v.action, v.target) == ("allow", "personal")
    v = verdict("* * work @default ask default_target=vault\n", "work", "@default")
    assert (v.action, v.target, v.default_target) == ("ask", "vault", "vault")
    # @anyvm matches every intended target, @default too (Qubes' AnyVM.match)
    v = verdict("* * work @anyvm allow target=personal\n", "work", "@default")
    assert (v.action, v.target) == ("allow", "personal")


def test_redirect_and_user():
    v = verdict("* * work personal allow target=vault user=alice\n", "work", "personal")
    assert (v.action, v.target, v.user) == ("allow", "vault", "alice")


def test_dispvm_targets():
    text = "* * vault @dispvm:work allow\n"
    assert verdict(text, "vault", "@dispvm").action == "allow"  # its default_dispvm
    assert verdict(text, "personal", "@dispvm").action == "deny"  # has none
    assert verdict("* * vault @dispvm:@tag:work allow\n", "vault", "@dispvm").action == "allow"
    assert verdict("* * vault @dispvm:@tag:home allow\n", "vault", "@dispvm").action == "deny"


@pytest.mark.parametrize("target", ["@dispvmX", "@garbage", "../x", "@dispvm:", "Work",
                                    "@dispvm:../x", "\x1b[2J"])
def test_odd_targets_denied_even_by_anyvm(target):
    v = verdict("* * @anyvm @anyvm allow\n", "work", target)
    assert v.action == "deny" and v.rule is None, target


def test_unknown_source_and_self_call_denied():
    assert verdict("* * @anyvm @anyvm allow\n", "sys-net", "work").action == "deny"
    assert verdict("* * @anyvm @anyvm allow\n", "work", "work").action == "deny"
    assert verdict("* * @anyvm @anyvm allow\n", "work", "nosuch").action == "deny"


@pytest.mark.parametrize("arg", ["../x", "a/b", "..", ".", ".hidden", "a\0b", "x" * 65,
                                 "a b", "é", "a;b"])
def test_name_tricks_denied_even_with_allow(arg):
    v = verdict("my.Svc * @anyvm @anyvm allow\n", "work", "personal", "my.Svc", arg)
    assert v.action == "deny" and v.rule is None, arg


def test_anti_plain_argument_allowed():
    """Anti-test of the above: the same line lets an ordinary argument through."""
    v = verdict("my.Svc * @anyvm @anyvm allow\n", "work", "personal", "my.Svc", "a.b-c_1+x")
    assert v.action == "allow"


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("line,words", [
    ("qubes.Filecopy * work personal", "4 fields"),
    ("qubes.Filecopy * work personal alow", "unknown action 'alow'"),
    ("qubes.Filecopy arg work personal allow", "does not start with '+'"),
    ("* +arg work personal allow", "* service takes only the * argument"),
    ("qubes/Filecopy * work personal allow", "service 'qubes/Filecopy'"),
    ("q * $anyvm personal allow", "old policy format"),
    ("q * work @adminvm allow", "no admin qube"),
    ("q * @default work allow", "target token, not a source"),
    ("q * @tog:x work allow", "unknown source token"),
    ("q * @type:Template work allow", "no such type"),
    ("q * work personal allow user=root", "never runs as host root"),
    ("q * work personal deny target=vault", "not a parameter of deny"),
    ("q * work personal allow target=../x", "is not a qube"),
    ("q * work personal allow notify=maybe", "notify="),
    ("q * Work personal allow", "not a qube name"),
    ("!include foo", "includes are not part"),
    ("q +../x work personal allow", "argument '+../x'"),
])
def test_errors_name_file_and_line(line, words):
    msg = err(f"# a comment\n\n{line}\n")
    assert msg.startswith("config: 30-user.policy:3: "), msg
    assert words in msg and "(fix: " in msg and "\n" not in msg, msg


def test_comments_blank_lines_and_commas():
    r = parse_text("  # x\n\nq + work personal allow target=vault,user=alice\n", "f")
    assert [x.params for x in r] == [(("target", "vault"), ("user", "alice"))]
    assert r[0].where == "f:3" and r[0].text() == \
        "q + work personal allow target=vault user=alice"


# --- files ------------------------------------------------------------------------------

def test_directory_order_and_suffix(tmp_path: Path):
    (tmp_path / "50-b.policy").write_text("q * work personal allow\n")
    (tmp_path / "30-a.policy").write_text("q * work personal deny\n")
    (tmp_path / "10-ignored.txt").write_text("garbage here\n")
    (tmp_path / ".hidden.policy").write_text("garbage\n")
    p = policy.load(str(tmp_path), "policy.d")
    assert p.files == ("policy.d/30-a.policy", "policy.d/50-b.policy")
    v = evaluate(p, "work", "personal", "q", "", QUBES)
    assert (v.action, v.rule) == ("deny", "policy.d/30-a.policy:1")


def test_missing_directory_is_empty(tmp_path: Path):
    p = policy.load(str(tmp_path / "nope"))
    assert p.rules == () and evaluate(p, "work", "personal", "q", "", QUBES).action == "deny"


def test_bad_file_name(tmp_path: Path):
    (tmp_path / "30-User.policy").write_text("")
    with pytest.raises(ConfigError, match="policy.d/30-User.policy: a policy file's name"):
        policy.load(str(tmp_path), "policy.d")


def test_check_names():
    p = pol("q * work persnal allow\n")
    with pytest.raises(ConfigError, match="t.policy:1: no app qube 'persnal'"):
        policy.check_names(p, QUBES)
    policy.check_names(pol("q * work @dispvm:vault allow target=personal\n"), QUBES)
    with pytest.raises(ConfigError, match="no app qube 'nope'"):
        policy.check_names(pol("q * work @anyvm allow target=@dispvm:nope\n"), QUBES)


# --- the config, and `up`'s check ------------------------------------------------------

BASE = """
[qubes.sys-net]
kind = "net"
[qubes.sys-firewall]
kind = "firewall"
netvm = "sys-net"
[qubes.work]
kind = "app"
netvm = "sys-firewall"
tags = ["work", "corp"]
[qubes.personal]
kind = "app"
netvm = "sys-firewall"
"""


def test_config_tags_and_stack_keys():
    t = config.parse('[stack]\npolicy = "p"\nservices = "s"\nask_timeout = 5\n' + BASE, SPECS)
    assert t["work"].tags == ("work", "corp")
    assert (t.policy, t.services, t.ask_timeout) == ("p", "s", 5.0)
    assert config.parse(BASE, SPECS).policy == "policy.d"
    with pytest.raises(ConfigError, match="field 'tags'"):
        config.parse(BASE.replace('["work", "corp"]', '["a b"]'), SPECS)
    with pytest.raises(ConfigError, match="ask_timeout"):
        config.parse("[stack]\nask_timeout = 0\n" + BASE, SPECS)
    assert config.parse("[stack]\ncall_max_bytes = 4096\n" + BASE, SPECS).call_max_bytes \
        == 4096
    for bad in ("0", "true", "1.5", '"1M"'):
        with pytest.raises(ConfigError, match="call_max_bytes"):
            config.parse(f"[stack]\ncall_max_bytes = {bad}\n" + BASE, SPECS)


def test_up_inputs_check_the_policy(tmp_path: Path):
    from netstack.model import UplinkSpec
    from netstack.plan import build, load_inputs

    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE)
    d = tmp_path / "policy.d"
    d.mkdir()
    (d / "30-user.policy").write_text("qubes.Filecopy * @tag:work personal allow\n")
    inputs = load_inputs(str(cfg), "t1", UplinkSpec("lab"), SPECS, overlay={}, probe=False)
    p = build(inputs, "t1", UplinkSpec("lab"))
    assert p.policy == str(d) and p.call_services is None
    (d / "40-bad.policy").write_text("\nqubes.Filecopy * work sys-net allow\n")
    with pytest.raises(ConfigError) as e:
        load_inputs(str(cfg), "t1", UplinkSpec("lab"), SPECS, overlay={}, probe=False)
    assert str(e.value).startswith("config: policy.d/40-bad.policy:2: no app qube 'sys-net'")
    os.unlink(d / "40-bad.policy")
    (d / "50-user.policy").write_text("my.Echo * work personal allow user=nosuchuser9\n")
    with pytest.raises(ConfigError) as e:  # an account that is not there: refused at up
        load_inputs(str(cfg), "t1", UplinkSpec("lab"), SPECS, overlay={}, probe=False)
    assert str(e.value).startswith("config: policy.d/50-user.policy:1: user=nosuchuser9: "
                                   "no such account")
    (d / "50-user.policy").write_text("my.Echo * work personal allow user=nobody\n")
    load_inputs(str(cfg), "t1", UplinkSpec("lab"), SPECS, overlay={}, probe=False)
    os.unlink(d / "50-user.policy")
    cfg.write_text('[stack]\nservices = "svc"\n' + BASE)
    with pytest.raises(ConfigError, match="'services'"):
        load_inputs(str(cfg), "t1", UplinkSpec("lab"), SPECS, overlay={}, probe=False)


# --- properties (hypothesis, bounded) ---------------------------------------------------

NAMES = sorted(QUBES)
src_tok = st.sampled_from(["@anyvm", "@tag:work", "@tag:home", "@type:AppVM",
                           "@type:DispVM", *NAMES])
dst_tok = st.sampled_from(["@anyvm", "@tag:work", "@tag:secret", "@default", "@dispvm",
                           "@dispvm:work", *NAMES])
line = st.tuples(st.sampled_from(["*", "a.Svc", "b.Svc"]), st.sampled_from(["*", "+", "+x"]),
                 src_tok, dst_tok, st.sampled_from(["allow", "deny", "ask"]))


def _text(lines: list[tuple[str, str, str, str, str]]) -> str:
    return "".join(" ".join(("*" if s == "*" else a) if i == 1 else x
                            for i, x in enumerate((s, a, so, t, act))) + "\n"
                   for s, a, so, t, act in lines)


calls = st.tuples(st.sampled_from(NAMES), st.sampled_from([*NAMES, "@default", "@dispvm"]),
                  st.sampled_from(["a.Svc", "b.Svc", "c.Svc"]), st.sampled_from(["", "x", "y"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(line, max_size=8), calls)
def test_verdict_is_the_first_matching_line(lines, call):
    """The verdict comes from the first line that matches, and no line matching is deny;
    an allow/ask never names the source or an unknown qube as target."""
    p = pol(_text(lines))
    src, dst, svc, arg = call
    v = evaluate(p, src, dst, svc, arg, QUBES)
    first = next((r for r in p.rules if policy.matches(r, svc, arg, src, dst, QUBES)), None)
    if first is None:
        assert v.action == "deny" and v.rule is None
    else:
        assert v.rule == first.where
        if v.action != "deny":
            assert v.action == first.action
            assert v.target != src and (v.target in QUBES or v.target.startswith("@dispvm"))


@settings(max_examples=200, deadline=None)
@given(st.lists(line, max_size=8), calls)
def test_a_deny_line_on_top_always_wins(lines, call):
    """Anything appended after a matching deny changes nothing (first match wins)."""
    src, dst, svc, arg = call
    top = f"{svc} * {src} @anyvm deny\n"
    v = evaluate(pol(top + _text(lines)), src, dst, svc, arg, QUBES)
    assert (v.action, v.rule) == ("deny", "t.policy:1")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_line_parses_or_fails_with_one_line(text):
    """No input makes the parser raise anything but a one-line ConfigError."""
    try:
        parse_text(text, "f.policy")
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("config: f.policy:")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_odd_arguments_allowed_only_when_plain(arg):
    v = evaluate(pol("s * @anyvm @anyvm allow\n"), "work", "personal", "s", arg, QUBES)
    plain = (len(arg) <= policy.MAX_NAME and set(arg) <= policy.ARG_CHARS
             and not arg.startswith("."))
    assert (v.action == "allow") == plain
