"""``metering bill``, ``metering invoices`` and the tiers' prices (``tiers prices|set-price``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from metering.cli.alerts import operator
from metering.cli.common import (
    Parser,
    day,
    decimal,
    month,
    non_negative_int,
    positive_int,
    table,
    user_id,
    when,
    with_db,
)
from metering.settings import Settings

T = TypeVar("T")


def add_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    bill = sub.add_parser(
        "bill", help="compute the month's invoices (drafts; re-run freely until final)"
    )
    bill.add_argument("--month", type=month, required=True, help="YYYY-MM")
    bill.add_argument("--user", type=user_id, action="append", help="only this user (repeatable)")

    inv = sub.add_parser("invoices", help="invoices: list, show, finalize, render")
    isub = inv.add_subparsers(dest="action", required=True, parser_class=Parser)
    ls = isub.add_parser("list", help="newest month first")
    ls.add_argument("--month", type=month)
    ls.add_argument("--user", type=user_id)
    ls.add_argument("--status", choices=["draft", "final"])
    ls.add_argument("--limit", type=positive_int, default=50)
    sh = isub.add_parser("show", help="one invoice: lines, adjustments, usage per day")
    sh.add_argument("ref", help="invoice id or number")
    rd = isub.add_parser("render", help="an invoice as PDF and/or HTML")
    rd.add_argument("ref", help="invoice id or number")
    rd.add_argument("--pdf", metavar="PATH")
    rd.add_argument("--html", metavar="PATH")
    fin = isub.add_parser("finalize", help="bill a month one last time and make it final")
    which = fin.add_mutually_exclusive_group(required=True)
    which.add_argument("--month", type=month)
    fin.add_argument("--by", help="who finalizes, for the record (default: your login name)")
    which.add_argument(
        "--due",
        action="store_true",
        help="every month past its grace period (what the worker does)",
    )
    add_notice_parsers(sub)


def add_notice_parsers(sub: argparse._SubParsersAction[Parser]) -> None:
    no = sub.add_parser("notices", help="usage threshold notifications sent to customers")
    no.add_argument("--user", type=user_id)
    no.add_argument("--limit", type=positive_int, default=50)


def add_price_parsers(tsub: argparse._SubParsersAction[Parser]) -> None:
    """``tiers prices`` and ``tiers set-price`` (the tiers group is metering.cli.accounts')."""
    tp = tsub.add_parser("prices", help="a tier's price versions, newest first")
    tp.add_argument("name")
    sp = tsub.add_parser(
        "set-price", help="a new price version: base, included units, overage bands"
    )
    sp.add_argument("name")
    sp.add_argument("--currency", default="USD", help="ISO 4217, e.g. USD, EUR (default USD)")
    sp.add_argument("--base", type=decimal, required=True, help="monthly base price, e.g. 49.00")
    sp.add_argument(
        "--included", type=non_negative_int, default=0, help="billable units included each month"
    )
    sp.add_argument(
        "--band",
        action="append",
        default=[],
        metavar="FROM:PRICE",
        help="overage band: units over the included from FROM on cost PRICE per 1,000 "
        "(repeatable, e.g. --band 0:0.50 --band 4000000:0.30; none: overage is free)",
    )
    sp.add_argument(
        "--from",
        dest="since",
        type=day,
        help="first UTC day it applies (default: next month's first)",
    )


def billing(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    from metering.billing.service import Billing

    return with_db(settings, lambda conn: work(Billing(conn)))


def money(amount: object, currency: str) -> str:
    return f"{amount} {currency}"


def cmd_bill(args: argparse.Namespace, settings: Settings) -> int:
    run = billing(settings, lambda b: b.bill(args.month, users=args.user))
    print_run("billed", run)
    for error in run.errors:
        print(f"metering: not billed: {error}", file=sys.stderr)
    return 1 if run.errors else 0


def print_run(verb: str, run: Any) -> None:
    totals = ", ".join(money(v, c) for c, v in sorted(run.totals.items())) or "nothing"
    extra = f", {run.finalized} made final" if run.finalized else ""
    print(
        f"{verb} {run.month:%Y-%m}: {run.invoices} invoices ({run.changed} changed, "
        f"{run.removed} removed, {run.adjustments} adjustments{extra}); total {totals}"
    )


def cmd_invoices(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "list":
        rows = billing(
            settings,
            lambda b: b.invoices(
                month=args.month, user=args.user, status=args.status, limit=args.limit
            ),
        )
        table(
            "invoices",
            ["id", "number", "month", "user", "status", "units", "subtotal", "adjustments", "total"],
            [
                (r["id"], r["number"], f"{r['month']:%Y-%m}", r["email"], r["status"],
                 f"{r['units']:,}", r["subtotal"], r["adjustments"], money(r["total"], r["currency"]))
                for r in rows
            ],
        )  # fmt: skip
    elif args.action == "show":
        show(*billing(settings, lambda b: b.get(args.ref)))
    elif args.action == "render":
        render(args, settings)
    elif args.due:
        grace = timedelta(days=settings.billing_grace_days)
        by = args.by or operator()
        runs = billing(settings, lambda b: b.finalize_due(grace=grace, by=by))
        for run in runs:
            print_run("finalized", run)
        if not runs:
            print(f"nothing due (grace period {settings.billing_grace_days} days after month end)")
    else:
        by = args.by or operator()
        print_run("finalized", billing(settings, lambda b: b.finalize(args.month, by=by)))
    return 0


def show(inv: Any, lines: list[Any], days: list[Any]) -> None:
    cur = inv["currency"]
    number = inv["number"] or f"draft #{inv['id']}"
    print(f"Invoice {number}  {inv['month']:%B %Y}  {inv['email']}  ({inv['status']})")
    if inv["status"] == "final":
        print(f"final since {when(inv['finalized_at'])} by {inv['finalized_by']}")
    else:
        print(f"computed {when(inv['computed_at'])}; changes until the month is final")
    table(
        "lines",
        ["#", "description", "period", "quantity", "unit price", "amount"],
        [
            (ln["line_no"], ln["description"], f"{ln['first_day']:%m-%d}..{ln['last_day']:%m-%d}",
             f"{ln['quantity']:,f}".rstrip("0").rstrip("."),
             "-" if ln["unit_price"] is None else f"{ln['unit_price']:.6f}".rstrip("0").rstrip("."),
             money(ln["amount"], cur))
            for ln in lines
        ],
    )  # fmt: skip
    print(f"subtotal {money(inv['subtotal'], cur)}")
    print(f"adjustments {money(inv['adjustments'], cur)}")
    print(f"total {money(inv['total'], cur)}")
    print(
        f"{inv['requests']:,} requests served, {inv['units']:,} billable units on {len(days)} day(s)"
    )


def render(args: argparse.Namespace, settings: Settings) -> None:
    from pathlib import Path

    from metering.billing import render as r
    from metering.errors import InputError

    if not (args.pdf or args.html):
        raise InputError("say where: --pdf PATH and/or --html PATH")
    v = r.view(*billing(settings, lambda b: b.get(args.ref)))
    if args.pdf:
        Path(args.pdf).write_bytes(r.pdf(v))
        print(f"wrote {args.pdf}")
    if args.html:
        Path(args.html).write_text(r.html(v), encoding="utf-8")
        print(f"wrote {args.html}")


def cmd_prices(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "prices":
        rows = billing(settings, lambda b: b.price_rows(args.name))
        table(
            f"prices of {args.name}",
            ["id", "from", "currency", "base/month", "included", "overage per 1,000", "invoices"],
            [
                (r["id"], "always" if r["effective_from"] == date.min else r["effective_from"],
                 r["currency"], r["base_monthly"], f"{r['included_units']:,}",
                 "; ".join(f"from {f:,}: {p}" for f, p in zip(r["band_from"], r["band_price"], strict=True))
                 or "free", r["invoices"])
                for r in rows
            ],
        )  # fmt: skip
        return 0
    from metering.billing.pricing import Price, band
    from metering.billing.service import today_utc

    since = args.since or (today_utc().replace(day=28) + timedelta(days=4)).replace(day=1)
    price = Price(args.currency, args.base, args.included, tuple(band(b) for b in args.band))
    price_id = billing(settings, lambda b: b.set_price(args.name, price, since=since))
    print(f"tier {args.name}: price version {price_id} from {since}")
    return 0


def cmd_notices(args: argparse.Namespace, settings: Settings) -> int:
    from metering.billing.notices import Notices

    rows = with_db(settings, lambda c: Notices(c).recent(args.user, args.limit))
    table(
        "usage notices",
        ["at", "user", "kind", "period", "threshold", "used", "limit"],
        [
            (when(r["created_at"]), r["email"], r["kind"], r["period"], f"{r['threshold']} %",
             r["used"], f"{r['limit_value']} {r['currency'] or 'requests'}")
            for r in rows
        ],
    )  # fmt: skip
    return 0


def cmd_spend_limit(args: argparse.Namespace, settings: Settings) -> int:
    from metering.accounts import store
    from metering.billing.notices import Notices
    from metering.errors import InputError

    if args.amount.lower() == "none":
        amount = None
    else:
        try:
            amount = decimal(args.amount)
        except argparse.ArgumentTypeError as exc:
            raise InputError(str(exc)) from None
        if amount == 0 or amount >= 10**12 or amount != amount.quantize(Decimal("0.01")):
            raise InputError(
                "a spend limit is > 0 and below 1,000,000,000,000, with at most 2 decimals "
                "(none removes it)"
            )

    async def work(conn: Any) -> Any:
        user = await store.get_user(conn, args.user)
        await Notices(conn).set_spend_limit(user.id, amount)
        return user

    user = with_db(settings, work)
    print(f"user {user.email}: monthly spend limit {amount if amount is not None else 'none'}")
    return 0


COMMANDS = {"bill": cmd_bill, "invoices": cmd_invoices, "notices": cmd_notices}
