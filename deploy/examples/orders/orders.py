"""Example flow code shipped in its own image (deploy/README.md, "Your flow code").

The worker image runs ``pgflow worker --import orders``; the same image starts instances with
``pgflow start orders:fulfil --input '{...}'``. tests/deploy/test_image.py builds this image and runs both.
"""

from __future__ import annotations

import time

from pgflow import Flow

fulfil = Flow("fulfil_order", max_attempts=3)


@fulfil.step()
def lines(ctx, input) -> list[dict]:
    return input["lines"]


@fulfil.map(over=lines)
def price(ctx, line: dict) -> int:
    """One task per order line: its price in cents."""
    return line["quantity"] * line["unit_cents"]


@fulfil.step()
def reserve(ctx, input) -> dict:
    """Stands in for a slow call to a warehouse system; ``ctx.idempotency_key`` is the same on every retry,
    so the warehouse can recognise a repeated reservation."""
    time.sleep(input.get("warehouse_seconds", 0))
    return {"reservation": ctx.idempotency_key, "skus": sorted(line["sku"] for line in input["lines"])}


@fulfil.step(after=[price, reserve])
def confirm(ctx, price: list[int], reserve: dict) -> dict:
    return {"total_cents": sum(price), **reserve}
