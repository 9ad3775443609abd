"""The SDK's overview methods (``get_stats``, ``list_examples``, ``pool_map``,
``get_selection_summary``), sync and async, against a real ``gradstore serve`` over the shared
stores; the values are those of the routes (checked against the Parquet files in
tests/service/test_overview.py)."""

from __future__ import annotations

import anyio
import pytest

from gradstore.client import AsyncClient, Client, NotFoundError
from gradstore.client.models import DatastoreStats, ExamplePage, MapResponse, SelectionSummary
from gradstore.service.process import ServiceProcess

KEY = "sdk-overview-key"


@pytest.fixture(scope="module")
def service(service_root):
    with ServiceProcess(service_root, api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(service):
    with Client(service.url, api_key=KEY) as c:
        yield c


def test_sync_overview_methods(client):
    stats = client.get_stats("pool", bins=5)
    assert isinstance(stats, DatastoreStats) and all(len(h.counts) == 5 for h in stats.histograms if h.counts)
    page = client.list_examples("pool", offset=38, limit=5)
    assert isinstance(page, ExamplePage) and [e.id for e in page.items] == ["more-10", "more-11"]
    assert [e.id for e in client.list_examples("pool", query="ex-3", limit=3).items] == ["ex-3"]
    first = client.select("pool", "targets", k=4)
    placed = client.pool_map("pool", sample=20, rows=[item.row for item in first.items], targets="targets")
    assert isinstance(placed, MapResponse) and placed.rows.rows == [item.row for item in first.items]
    assert len(placed.targets.x) == 6 and len(placed.sample.x) == 20
    summary = client.get_selection_summary("pool", first.selection_id)
    assert isinstance(summary, SelectionSummary) and summary.total == 4
    assert client.get_example("pool", "ex-1").scores  # the stored loss and grad norm per checkpoint
    with pytest.raises(NotFoundError):
        client.get_stats("nope")


def test_async_overview_methods(service):
    async def main():
        async with AsyncClient(service.url, api_key=KEY) as c:
            return await c.list_examples("pool", limit=3), await c.get_stats("pool")

    page, stats = anyio.run(main)
    assert [e.id for e in page.items] == ["ex-0", "ex-1", "ex-2"] and stats.examples == 40
