"""An invoice as people read it: HTML (a Jinja2 template, autoescaped) and PDF
(fpdf2, with the DejaVu Sans font matplotlib ships, so any name prints).

Both come from one :class:`View` of an invoice with its figures already
formatted, so the two always say the same thing. They need the ``reports``
extra (``pip install 'metering[reports]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from metering.errors import InputError


@dataclass(frozen=True, slots=True)
class ViewLine:
    kind: str
    description: str
    period: str
    quantity: str
    unit_price: str
    amount: str


@dataclass(frozen=True, slots=True)
class ViewDay:
    date: str
    requests: str
    units: str


@dataclass(frozen=True, slots=True)
class View:
    title: str
    draft: bool
    month_label: str
    period: str
    finalized: str
    customer: str
    email: str
    user_id: str
    tiers: str
    lines: list[ViewLine]
    subtotal: str
    adjustments: str
    total: str
    days: list[ViewDay]
    usage_summary: str


def money(amount: Decimal, currency: str) -> str:
    return f"{amount:,.2f} {currency}"


def _trim(value: Decimal) -> str:
    text = f"{value:,f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def view(inv: Any, lines: Sequence[Any], days: Sequence[Any]) -> View:
    cur = inv["currency"]
    month = inv["month"]
    tiers = list(dict.fromkeys(ln["tier"] for ln in lines if ln["kind"] == "base" and ln["tier"]))
    requests = sum(int(d["requests"]) for d in days)
    units = sum(int(d["units"]) for d in days)
    return View(
        title=f"Invoice {inv['number']}" if inv["number"] else f"Draft invoice #{inv['id']}",
        draft=inv["status"] != "final",
        month_label=f"{month:%B %Y}",
        period=f"Usage of {month:%B %Y} (UTC)",
        finalized=(
            inv["finalized_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
            if inv["finalized_at"]
            else ""
        ),
        customer=inv["user_name"] or inv["email"],
        email=inv["email"],
        user_id=str(inv["user_id"]),
        tiers=", ".join(tiers) or "-",
        lines=[
            ViewLine(
                kind=ln["kind"],
                description=ln["description"],
                period=f"{ln['first_day']:%d %b} - {ln['last_day']:%d %b %Y}",
                quantity=_trim(ln["quantity"]),
                unit_price="" if ln["unit_price"] is None else _trim(round(ln["unit_price"], 6)),
                amount=money(ln["amount"], cur),
            )
            for ln in lines
        ],
        subtotal=money(inv["subtotal"], cur),
        adjustments=money(inv["adjustments"], cur),
        total=money(inv["total"], cur),
        days=[
            ViewDay(f"{d['date']:%Y-%m-%d}", f"{d['requests']:,}", f"{d['units']:,}") for d in days
        ],
        usage_summary=f"{requests:,} requests served, {units:,} billable units",
    )


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"rendering needs {module.split('.')[0]}: pip install 'metering[reports]'"
        ) from None


def html(v: View) -> str:
    jinja2 = _need("jinja2")
    text = resources.files("metering.billing").joinpath("templates/invoice.html").read_text()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return str(env.from_string(text).render(inv=v))


def font_path() -> Path:
    """DejaVu Sans as matplotlib ships it (every glyph a name might need)."""
    matplotlib = _need("matplotlib")
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def pdf(v: View) -> bytes:
    fpdf = _need("fpdf")
    doc = fpdf.FPDF(format="A4")
    regular = font_path()
    doc.add_font("DejaVu", "", str(regular))
    doc.add_font("DejaVu", "B", str(regular.with_name("DejaVuSans-Bold.ttf")))
    doc.set_auto_page_break(True, margin=15)
    doc.add_page()
    doc.set_title(v.title)
    doc.set_font("DejaVu", "B", 16)
    doc.cell(0, 9, v.title, new_x="LMARGIN", new_y="NEXT")
    doc.set_font("DejaVu", "", 10)
    doc.cell(0, 6, v.period, new_x="LMARGIN", new_y="NEXT")
    if v.draft:
        doc.set_text_color(180, 35, 24)
        doc.cell(
            0,
            6,
            f"Draft: amounts can change until {v.month_label} is final.",
            new_x="LMARGIN",
            new_y="NEXT",
        )
        doc.set_text_color(0, 0, 0)
    else:
        doc.cell(0, 6, f"Final since {v.finalized}.", new_x="LMARGIN", new_y="NEXT")
    doc.ln(3)
    for text in (v.customer, v.email, f"customer {v.user_id}", f"tier: {v.tiers}"):
        doc.cell(0, 5, text, new_x="LMARGIN", new_y="NEXT")
    doc.ln(4)

    doc.set_font("DejaVu", "", 8.5)
    right = ("LEFT", "LEFT", "RIGHT", "RIGHT", "RIGHT")
    with doc.table(col_widths=(70, 42, 24, 22, 32), text_align=right, line_height=5.5) as table:
        table.row(("Description", "Period", "Quantity", "Unit price", "Amount"))
        for ln in v.lines:
            table.row((ln.description, ln.period, ln.quantity, ln.unit_price, ln.amount))
        table.row(("Subtotal (" + v.month_label + ")", "", "", "", v.subtotal))
        table.row(("Adjustments of earlier months", "", "", "", v.adjustments))
        table.row(("Total", "", "", "", v.total))
    doc.ln(4)
    doc.set_font("DejaVu", "B", 11)
    doc.cell(0, 7, "Usage per day", new_x="LMARGIN", new_y="NEXT")
    doc.set_font("DejaVu", "", 8.5)
    doc.multi_cell(
        0, 5, f"{v.usage_summary}. Requests the edge refused (401, 403, 429) are never billed."
    )
    doc.ln(2)
    if v.days:
        with doc.table(
            col_widths=(40, 40, 40), text_align=("LEFT", "RIGHT", "RIGHT"), line_height=5
        ) as t:
            t.row(("Day (UTC)", "Requests served", "Billable units"))
            for d in v.days:
                t.row((d.date, d.requests, d.units))
    return bytes(doc.output())
