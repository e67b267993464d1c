#!/usr/bin/env python3
"""Verdict and summary of a run-systemd.sh run, from the host-stamped serial log (serial.ts).

Each line of serial.ts is "HOST_EPOCH_SECONDS TEXT".  The guest driver (guest/luotest) prints
"LUOTEST boot=N event=E key=value ..." lines; the kernel prints one "Linux version" banner per boot; systemd
prints "Started <unit> - <description>" to the console when a Type=notify service sends READY=1.

PASS iff: qemu ended by itself (no timeout), exactly 1 + --updates kernel banners, a LUOTEST boot line for each
boot, no failed check, the last boot's result=PASS, no kernel panic.  With --forced the driver then kexecs
with --force into a kernel of another LUO format: one more banner is expected, and what that kernel printed
about LUO (a panic included) is reported, not judged.
Blackouts (from the kexec request to the demo's READY=1) are given three ways:
  host    the host's clock: the serial line of the request vs systemd's "Started" line in the next boot
          (the line is printed when the job completes, i.e. right after READY=1)          <- trusted
  rtc     the guest's CLOCK_REALTIME, corrected with the RTC offset measured in each boot
  guest   the guest's CLOCK_REALTIME as is (after a kexec it restarts from the RTC's whole second)
Exit 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Optional

KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
DEMO = "luo-demo-cache.service"
NATIVE = "luo-native-cache.service"
# systemd's console status line, ANSI colours removed; the unit name may be cut ("luo-demo-cache.se…").
STARTED = {
    DEMO: re.compile(r"\] Started luo-demo-cache\.|systemd\[1\]: Started luo-demo-cache\.service"),
    NATIVE: re.compile(r"\] Started luo-native-cache\.|systemd\[1\]: Started luo-native-cache\.service"),
}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_kv(text: str) -> dict[str, str]:
    out = {}
    for k, v in KV.findall(text):
        out[k] = json.loads(v) if v.startswith('"') else v
    return out


def fnum(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt(v: Optional[float], unit: str = "s") -> str:
    return "n/a" if v is None else f"{v:.2f}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ts")
    ap.add_argument("--suite", default="?")
    ap.add_argument("--qemu-rc", type=int, default=0)
    ap.add_argument("--qemu-seconds", type=float, default=None)
    ap.add_argument("--inputs", default="")
    ap.add_argument("--updates", type=int, default=2, help="live updates the driver makes")
    ap.add_argument("--forced", action="store_true", help="the driver ends with a forced kexec of another format")
    a = ap.parse_args()
    updates = a.updates

    lines: list[tuple[float, str]] = []
    with open(a.ts, encoding="utf-8", errors="replace", newline="\n") as f:
        for raw in f:
            t, _, text = raw.rstrip("\n").partition(" ")
            lines.append((float(t), ANSI.sub("", text)))
    t0 = lines[0][0] if lines else 0.0

    boot = 0  # kernel boot index on the serial line (1 = cold boot)
    banners: list[float] = []
    events: list[dict[str, Any]] = []
    started: dict[tuple[int, str], float] = {}
    panics = []
    forced_lines: list[str] = []
    for t, text in lines:
        if "Linux version" in text:
            boot += 1
            banners.append(t)
        if "Kernel panic" in text:
            panics.append(text)
        for unit, rx in STARTED.items():
            if rx.search(text) and (boot, unit) not in started:
                started[(boot, unit)] = t
        if a.forced and boot > 1 + updates and re.search(r"(?i)luo|liveupdate|kho|panic|incompatible", text):
            forced_lines.append(text)
        i = -1 if "LUOJOURNAL " in text else text.find("LUOTEST ")  # journal dumps quote earlier lines
        if i >= 0:
            ev = parse_kv(text[i + len("LUOTEST ") :])
            ev["_t"] = t
            ev["_kboot"] = boot
            events.append(ev)

    def evs(name: str, b: Optional[int] = None) -> list[dict[str, Any]]:
        return [e for e in events if e.get("event") == name and (b is None or e.get("boot") == str(b))]

    problems = []
    if a.qemu_rc in {124, 137}:
        problems.append(f"qemu timed out (rc {a.qemu_rc})")
    elif a.qemu_rc != 0:
        problems.append(f"qemu exited with {a.qemu_rc}")
    forced = evs("forced-request")
    want_banners = 1 + updates + (1 if a.forced else 0)
    if len(banners) != want_banners:
        problems.append(f"{len(banners)} kernel boot(s), want {want_banners}")
    if a.forced and not forced:
        problems.append("the driver never made the forced kexec")
    for b in range(1, 2 + updates):
        if not evs("boot", b):
            problems.append(f"no LUOTEST line from boot {b}")
    checks = evs("check")
    failed = [c for c in checks if c.get("ok") != "1"]
    for c in failed:
        problems.append("check failed: " + " ".join(f"{k}={v}" for k, v in c.items() if not k.startswith("_")))
    for e in evs("traceback"):
        problems.append("guest traceback: " + e.get("line", ""))
    results = [e for e in evs("result") if e.get("result") != "FORCED"]
    last = results[-1] if results else {}
    if last.get("result") != "PASS" or last.get("boot") != str(1 + updates):
        problems.append(f"guest result: {last.get('result', 'none')} in boot {last.get('boot', '?')}")
    forced_t = forced[0]["_t"] if forced else None
    problems += [f"kernel panic: {p}" for p in panics if forced_t is None]

    # --- summary -----------------------------------------------------------------------------------------
    out = []
    b1 = (evs("boot", 1) or [{}])[0]
    out.append(f"run-systemd: {a.suite}, systemd {b1.get('systemd', '?')}, kernel {b1.get('kernel', '?')}")
    if a.inputs:
        out.append(f"  inputs (cached or built): {a.inputs}")
    if b1:
        out.append(
            f"  boot 1 (cold): qemu start -> driver running {b1['_t'] - t0:.1f}s (guest uptime {b1.get('uptime')}s), "
            f"system {b1.get('system')}"
        )
    for e in evs("failed-unit"):
        out.append(f"  boot {e.get('boot')}: failed unit {e.get('unit')}")
    demo0 = (evs("demo-before", 1) or [{}])[0]
    if demo0:
        out.append(
            f"  demo cold start: built {int(demo0.get('cache_bytes', 0)) >> 20} MiB in "
            f"{fnum(demo0.get('build_or_restore')) or 0:.2f}s, sha256 {str(demo0.get('sha256'))[:16]}…"
        )
    blackout_rows = []
    for n in range(1, 1 + updates):
        req = (evs("kexec-request", n) or [{}])[0]
        if not req:
            continue
        trig = req.get("trigger")
        started_evt = (evs("kexec-started", n) or [{}])[0]
        load_evt = (evs("kexec-load", n) or [{}])[0]
        banner = banners[n] if len(banners) > n else None
        new_boot = (evs("boot", n + 1) or [{}])[0]
        out.append(f"  update {n} ({trig}):")
        if started_evt:
            out.append(
                f"    liveupdatectl kexec (load + pre-flight + arm + start the target) returned in "
                f"{fnum(started_evt.get('seconds')) or 0:.2f}s, rc {started_evt.get('rc')}"
            )
        if load_evt:
            out.append(
                f"    {load_evt.get('tool')} (pre-flight + kexec_file_load) took "
                f"{fnum(load_evt.get('seconds')) or 0:.2f}s (before the request)"
            )
        if banner is not None:
            out.append(f"    request -> new kernel's banner (host): {banner - req['_t']:.2f}s")
        for unit, label in ((DEMO, "demo (luod)"), (NATIVE, "native (systemd's own LUO)")):
            ready_host = started.get((n + 1, unit))
            bo = [e for e in evs("blackout", n + 1) if e.get("unit") == unit]
            if ready_host is None and not bo:
                continue
            host = ready_host - req["_t"] if ready_host is not None else None
            rtc = fnum(bo[0].get("rtc_corrected")) if bo else None
            guest = fnum(bo[0].get("guest_realtime")) if bo else None
            restore_evt = (evs("demo" if unit == DEMO else "native", n + 1) or [{}])[0]
            restore = fnum(restore_evt.get("build_or_restore"))
            out.append(
                f"    blackout {label}: host {fmt(host)}, guest RTC-corrected {fmt(rtc)}, guest realtime {fmt(guest)}; "
                f"its restore (start -> READY) {fmt(restore)}, ready at new-kernel uptime "
                f"{fmt(fnum(restore_evt.get('ready_uptime')))}"
            )
            blackout_rows.append((n, trig, label, host, rtc, guest))
        vm_b, vm_a = (evs("vm-before", n) or [{}])[0], (evs("vm-after", n + 1) or [{}])[0]
        vm_f = (evs("vm-figures", n + 1) or [{}])[0]
        if vm_b and vm_a:
            out.append(
                f"    VM guest: boot id {vm_b.get('boot_id')} -> {vm_a.get('boot_id')}, "
                f"uptime {vm_b.get('uptime_sec')}s -> {vm_a.get('uptime_sec')}s, "
                f"counter {vm_b.get('counter')} -> {vm_a.get('counter')}, 16 MiB sha256 "
                f"{'identical' if vm_b.get('region_sha256') == vm_a.get('region_sha256') else 'DIFFERENT'}"
            )
        if vm_f:
            out.append(
                f"    VM: RAM {vm_f.get('ram_bytes')} bytes kept, state {vm_f.get('state_bytes')} bytes; pause "
                f"{fmt(fnum(vm_f.get('vm_pause')))}; save+quit {fmt(fnum(vm_f.get('save_quit')))}, restore "
                f"{fmt(fnum(vm_f.get('restore')))} (Python {fmt(fnum(vm_f.get('python')))}, QEMU up "
                f"{fmt(fnum(vm_f.get('qemu_up')))}, state load {fmt(fnum(vm_f.get('load')))})"
            )
        if new_boot:
            out.append(
                f"    boot {n + 1}: driver running at guest uptime {new_boot.get('uptime')}s, "
                f"system {new_boot.get('system')}"
            )
    for e in evs("verify"):
        out.append(
            f"  boot {e.get('boot')}: liveupdatectl verify: {e.get('verdict')} (exit {e.get('rc')}), "
            f"{e.get('restored')}/{e.get('carried')} unit(s) have their fds back, LiveUpdatesCount {e.get('count')}"
        )
    for _, text in lines:
        if "LUOVERIFY " in text and "LUOJOURNAL " not in text:
            out.append("    " + text[text.find("LUOVERIFY ") :])
    for e in evs("mismatch-prepare"):
        out.append(f"  mismatch: liveupdatectl prepare luo-v6 kernel -> exit {e.get('rc')}: {e.get('err')}")
    if forced:
        out.append(f"  forced: liveupdatectl kexec --force into the luo-v6 kernel ({forced[0].get('kernel')})")
        out += [f"  forced kernel: {line}" for line in forced_lines[:40]]
        for e in evs("after-forced"):
            out.append(f"  forced kernel booted user space: luod phase {e.get('phase')}, problems {e.get('problems')}")
    for e in evs("ebusy"):
        if e.get("lines") not in ("0", None):
            out.append(
                f"  boot {e.get('boot')}: {e.get('lines')} EBUSY line(s) in journal boot {e.get('journal_boot')}"
            )
    out.append(f"  kernel boots: {len(banners)}; checks: {len(checks) - len(failed)} passed, {len(failed)} failed")
    if a.qemu_seconds is not None:
        out.append(f"  qemu wall time: {a.qemu_seconds:.1f}s (rc {a.qemu_rc})")
    for p in problems:
        out.append(f"  PROBLEM: {p}")
    for n, trig, label, host, rtc, guest in blackout_rows:
        out.append(
            f"BLACKOUT update={n} trigger={trig} unit={label.split()[0]} "
            f"host={fmt(host)} rtc={fmt(rtc)} guest={fmt(guest)}"
        )
    # Issue 15's figure: each update's blackout through luod over the native fd store's, same run, same clock.
    by_update: dict[int, dict[str, tuple[Optional[float], Optional[float]]]] = {}
    for n, _, label, host, rtc, _ in blackout_rows:
        by_update.setdefault(n, {})[label.split()[0]] = (host, rtc)
    for n, units in sorted(by_update.items()):
        if "demo" in units and "native" in units:
            ratios = [d / b if d is not None and b else None for d, b in zip(units["demo"], units["native"])]
            out.append(f"BLACKOUT-RATIO update={n} luod/native host={fmt(ratios[0], 'x')} rtc={fmt(ratios[1], 'x')}")
    out.append(f"RESULT {'PASS' if not problems else 'FAIL'}")
    print("\n".join(out))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
