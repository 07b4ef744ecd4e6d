"""``attnpack info``: versions, device, and which attention backends work on this machine."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, device and working attention backends")
    p.add_argument("--device", default=None, help="device to probe (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._env import environment_report
    from ..techniques import available_techniques

    report = environment_report(args.device)
    report["techniques"] = {
        name: {"summary": t.summary, "options": {o.name: o.help for o in t.options}}
        for name, t in available_techniques().items()
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"python:   {report['python']}")
    dev = report["device"]
    print("device:   " + ", ".join(f"{k}={v}" for k, v in dev.items()))
    print("attention backends:")
    for name, res in report["backends"].items():
        print(f"  {name:9s} {'yes' if res['ok'] else 'no ':3s}  {res['detail']}")
    print("techniques (attnpack generate --technique NAME --opt KEY=VALUE):")
    for name, tech in report["techniques"].items():
        print(f"  {name}: {tech['summary']}")
        for opt, help_text in tech["options"].items():
            print(f"      {opt}: {help_text}")
    return 0
