"""liveupdatectl: status, list, preflight, prepare, kexec, verify, cancel, finish, discard.  See liveupdatectl(1).

Data goes to stdout (``--json=pretty|short`` for machines), one-line errors to stderr, exit codes from
``errors.ExitCode``.  It talks to luod over Varlink; the only child process it starts is systemctl.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Callable, Optional

from luo_systemd import config, processes, varlink
from luo_systemd.api import Problem, refusing
from luo_systemd.errors import ExitCode, LuoError, PreflightFailed
from luo_systemd.kexec import (
    KernelImage,
    LoadedState,
    Loader,
    NextKernel,
    default_image,
    live_update_cmdline,
    loader_for,
)
from luo_systemd.kexec_preflight import loaded_kernel_problems
from luo_systemd.runfiles import read_last_update
from luo_systemd.verify import Verdict, format_verdict, verify

SYSTEMCTL_TIMEOUT_SEC = 30.0  # systemctl start --no-block only queues the job


class JsonMode(str, enum.Enum):
    OFF = "off"
    SHORT = "short"
    PRETTY = "pretty"


@dataclasses.dataclass(frozen=True)
class Options:
    verb: str
    json: JsonMode
    unit: str
    force: bool
    dry_run: bool
    kernel: Optional[str]
    initrd: Optional[str]
    append: str
    debug: bool
    config_files: tuple[str, ...]


class Ctl:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.cfg = config.load(opts.config_files or config.config_files())
        self.target: Optional[NextKernel] = None  # the kernel this command loaded

    def call(self, method: str, params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        with varlink.Client(self.cfg.varlink_socket, timeout=60) as client:
            reply, fds = client.call(method, params)
        varlink.close_all(fds)
        return reply

    def loader(self) -> Loader:
        return loader_for(self.cfg)

    def emit(self, data: Any, text: Callable[[Any], str]) -> None:
        if self.opts.json is JsonMode.OFF:
            out = text(data)
            if out:
                print(out)
        else:
            print(json.dumps(data, indent=2 if self.opts.json is JsonMode.PRETTY else None))

    # -- verbs

    def status(self) -> int:
        status = self.call("Status")
        loaded = self.loader().state()
        status["kexec_loaded"] = loaded.loaded
        self.emit(status, format_status)
        return 0

    def list_fds(self) -> int:
        units = [self.opts.unit] if self.opts.unit else [u["unit"] for u in self.call("Status")["units"]]
        rows = [dict(fd, unit=unit) for unit in units for fd in self.call("List", {"unit": unit})["fds"]]
        self.emit(rows, format_list)
        return 0

    def problems(self) -> list[Problem]:
        return problems_of(self.call("Preflight")["problems"])

    def preflight(self) -> int:
        problems = self.problems()
        self.emit({"problems": rows(problems)}, lambda _: preflight_text(problems))
        return ExitCode.PREFLIGHT if refusing(problems) else 0

    def image(self) -> Optional[KernelImage]:
        """The kernel to load: --kernel, else the running one, unless one is loaded and none was asked for."""
        if self.opts.kernel:
            with open("/proc/cmdline") as f:
                return KernelImage(self.opts.kernel, self.opts.initrd, live_update_cmdline(f.read(), self.opts.append))
        if self.loader().state().loaded:
            return None
        return default_image(self.opts.append)

    def check_target(self, image: KernelImage) -> NextKernel:
        """The image's LUO format against the running kernel's, before it is loaded."""
        target = NextKernel.of(image)
        state = LoadedState(True, image.cmdline, target.formats(), target.unreadable)
        mismatch = [Problem("", m) for m in loaded_kernel_problems(state, self.loader().running_formats)]
        if mismatch and not self.opts.force:
            raise PreflightFailed(
                f"Pre-flight check failed, {image.kernel} was not loaded and nothing was stopped:\n"
                + format_problems(mismatch)
            )
        return target

    def load_checked(self, image: Optional[KernelImage], what: str) -> list[Problem]:
        """Loads ``image`` (None: keep the loaded kernel) and runs the pre-flight; a kernel loaded here is
        unloaded again when the pre-flight fails, so none that fails it is left for a reboot to kexec.
        Units left out of the live update do not fail it."""
        if image is not None:
            self.target = self.check_target(image)
            self.loader().load(image)
        problems = self.problems()
        if refusing(problems) and not self.opts.force:
            if image is not None:
                self.loader().unload()
            raise PreflightFailed(f"Pre-flight check failed, {what}:\n" + format_problems(problems))
        return problems

    def prepare(self) -> int:
        """Pre-flight, then load the target: afterwards a plain reboot from any tool is a checked live update."""
        image = self.image() or default_image(self.opts.append)
        problems = self.load_checked(image, f"{image.kernel} was unloaded again")
        warn(problems, "loaded despite")
        self.emit(
            {**dataclasses.asdict(self.target or NextKernel.of(image)), "problems": rows(problems)},
            lambda d: (
                f"Loaded {d['kernel']} ({', '.join(d['identifiers'])}), command line: {d['cmdline']}\n"
                + (
                    "A reboot is now a live update."
                    if not refusing(problems)
                    else "Pre-flight problems remain (forced)."
                )
            ),
        )
        return 0

    def verify(self) -> int:
        result = verify(read_last_update(self.cfg.last_update_file), self.call("Status"))
        self.emit(result, format_verdict)
        return Verdict(result["verdict"]).exit_code

    def kexec(self) -> int:
        image = self.image()
        plan = []
        if image is not None:
            plan.append(
                f"load {image.kernel}"
                + (f" with {image.initrd}" if image.initrd else "")
                + f" by kexec_file_load, command line: {image.cmdline}"
            )
        else:
            plan.append("use the kernel already loaded (pass --kernel to load another)")
        plan += [
            "run the pre-flight check",
            "arm luod: units are preserved as they stop",
            "systemctl start --job-mode=replace-irreversibly liveupdate.target",
        ]
        if self.opts.dry_run:
            problems = self.problems()
            self.emit(
                {"plan": plan, "problems": rows(problems)},
                lambda d: (
                    "\n".join(f"{i}. {step}" for i, step in enumerate(d["plan"], 1)) + "\n" + preflight_text(problems)
                ),
            )
            return 0
        problems = self.load_checked(image, "nothing was stopped")
        warn(problems, "forced despite")
        self.call("Arm", {"force": self.opts.force})
        try:
            processes.run(
                ["systemctl", "start", "--no-block", "--job-mode=replace-irreversibly", "liveupdate.target"],
                SYSTEMCTL_TIMEOUT_SEC,
            )
        except processes.ChildFailed as e:
            self.call("Cancel")
            raise LuoError(f"Failed to start liveupdate.target ({e}); the live update was cancelled") from None
        self.emit({"started": True, "problems": rows(problems)}, lambda _: "Live update started.")
        return 0

    def cancel(self) -> int:
        self.call("Cancel")
        return 0

    def finish(self) -> int:
        finished = self.call("Finish", {"unit": self.opts.unit})["finished"]
        self.emit(
            {"unit": self.opts.unit, "finished": finished},
            lambda d: "" if d["finished"] else f"{d['unit']} had nothing to finish.",
        )
        return 0

    def discard(self) -> int:
        self.call("Discard", {"unit": self.opts.unit})
        return 0


def problems_of(wire: list[dict[str, Any]]) -> list[Problem]:
    return [Problem(str(p["unit"]), str(p["message"]), bool(p.get("left_out", False))) for p in wire]


def rows(problems: list[Problem]) -> list[dict[str, Any]]:
    return [p._asdict() for p in problems]


def warn(problems: list[Problem], forced: str) -> None:
    """Each problem on stderr: those of units left out as they are, the others as forced."""
    for p in problems:
        print(f"Warning: {p.line()}" if p.left_out else f"Warning: {forced}: {p.line()}", file=sys.stderr)


def format_problems(problems: list[Problem]) -> str:
    return "\n".join(f"  - {p.line()}" for p in problems)


def preflight_text(problems: list[Problem]) -> str:
    if not problems:
        return "Pre-flight check passed."
    if refusing(problems):
        return format_problems(problems)
    return format_problems(problems) + "\nPre-flight check passed; the units above are left out of the live update."


def format_status(s: dict[str, Any]) -> str:
    lines = [
        f"   Phase: {s['phase']}",
        f"     LUO: {'supported' if s['supported'] else 'not supported'} ({s['backend']} backend)",
        f"  Kernel: {'loaded' if s['kexec_loaded'] else 'not loaded'} for the next kexec",
        f" Updates: {s['live_update_count']} live update(s) behind this boot",
        f"   Units: {len(s['units'])}",
    ]
    for u in s["units"]:
        state = "restored, not finished" if not u["finished"] else f"{u['preserved']}/{u['stored']} preserved"
        lines.append(f"          {u['unit']}: {u['stored']} stored, {u['restored']} restored, {state}")
    if s["problems"]:
        lines.append("Problems:\n" + format_problems(problems_of(s["problems"])))
    return "\n".join(lines)


def format_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No fds held."
    width = max(len(r["unit"]) for r in rows)
    out = [f"{'UNIT':<{width}}  {'NAME':<24} {'KIND':<8} {'STATE':<10} ORDER"]
    out += [f"{r['unit']:<{width}}  {r['name']:<24} {r['kind']:<8} {r['state']:<10} {r['order']}" for r in rows]
    return "\n".join(out)


VERBS: dict[str, Callable[[Ctl], int]] = {
    "status": Ctl.status,
    "list": Ctl.list_fds,
    "preflight": Ctl.preflight,
    "prepare": Ctl.prepare,
    "kexec": Ctl.kexec,
    "verify": Ctl.verify,
    "cancel": Ctl.cancel,
    "finish": Ctl.finish,
    "discard": Ctl.discard,
}


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="liveupdatectl", description="Control kernel live updates (see liveupdatectl(1))."
    )
    parser.add_argument("--json", choices=[m.value for m in JsonMode], default="off", help="pretty|short|off")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--config", action="append", default=[], help="luod configuration files to read")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("status", help="phase, LUO support, loaded kernel, units")
    sub.add_parser("list", help="the fds held for each unit").add_argument("unit", nargs="?", default="")
    sub.add_parser("preflight", help="check that a live update would lose nothing")
    k = sub.add_parser("kexec", help="kexec into a kernel with live update")
    k.add_argument("--kernel", help="kernel image to load (default: the running kernel, unless one is loaded)")
    k.add_argument("--initrd")
    k.add_argument("--append", default="", help="extra kernel command line arguments")
    k.add_argument("--force", action="store_true", help="go ahead despite pre-flight problems (data may be lost)")
    k.add_argument("--dry-run", action="store_true", help="show the plan and the pre-flight result only")
    p = sub.add_parser("prepare", help="pre-flight, then load a kernel: a plain reboot becomes a live update")
    p.add_argument("kernel", nargs="?", help="kernel image (default: the running kernel's)")
    p.add_argument("initrd", nargs="?")
    p.add_argument("--append", default="", help="extra kernel command line arguments")
    p.add_argument("--force", action="store_true", help="load despite pre-flight problems")
    sub.add_parser("verify", help="did the last live update give every unit its fds back")
    sub.add_parser("cancel", help="call off an armed live update")
    sub.add_parser("finish", help="finish a unit's restore").add_argument("unit")
    sub.add_parser("discard", help="free everything held for a unit").add_argument("unit")
    a = parser.parse_args(argv)
    return Options(
        verb=a.verb,
        json=JsonMode(a.json),
        unit=getattr(a, "unit", ""),
        force=getattr(a, "force", False),
        dry_run=getattr(a, "dry_run", False),
        kernel=getattr(a, "kernel", None),
        initrd=getattr(a, "initrd", None),
        append=getattr(a, "append", ""),
        debug=a.debug,
        config_files=tuple(a.config),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return VERBS[opts.verb](Ctl(opts))
    except LuoError as e:
        if opts.debug:
            traceback.print_exc()
        print(f"liveupdatectl: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if opts.debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"liveupdatectl: {e.strerror or e}{where}", file=sys.stderr)
        return ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
