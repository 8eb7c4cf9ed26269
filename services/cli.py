"""The ``parking`` command: the local stack, migrations, demo data and admin operations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
import psycopg

ROOT = Path(__file__).resolve().parent.parent


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise click.ClickException("DATABASE_URL is not set")
    return url


def _redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        raise click.ClickException("REDIS_URL is not set")
    return url


def _print(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


@click.group()
def main() -> None:
    """Smart parking platform administration."""


@main.command()
def migrate() -> None:
    """Apply pending SQL migrations."""
    from services.common.migrate import migrate as apply

    _print({"applied": apply(_database_url())})


@main.command()
@click.option("--demo", is_flag=True, required=True, help="seed the Hangzhou demo lots and keys")
def seed(demo: bool) -> None:
    """Seed demo operators, a city key and lots; print the keys (JSON)."""
    from services.common.redis import connect
    from services.common.seed import seed_demo
    from services.ingestion.registry import sync_lots_to_redis

    with psycopg.connect(_database_url(), autocommit=True) as conn:
        result = seed_demo(conn)
        redis_url = os.environ.get("REDIS_URL")
        if redis_url:
            sync_lots_to_redis(conn, connect(redis_url, 5.0))
    _print(result)


@main.command("rebuild-cache")
def rebuild_cache() -> None:
    """Rebuild Redis' live state (lots, geo index, district and city totals) from PostgreSQL."""
    from services.common.redis import connect
    from services.ingestion.registry import rebuild_cache as rebuild

    with psycopg.connect(_database_url(), autocommit=True) as conn:
        _print({"lots": rebuild(conn, connect(_redis_url(), 5.0))})


@main.group()
def admin() -> None:
    """Operators and city keys."""


@admin.command("create-operator")
@click.argument("name")
def create_operator(name: str) -> None:
    """Create an operator and print its API key (shown once)."""
    from services.common.principals import create_operator as create

    with psycopg.connect(_database_url(), autocommit=True) as conn:
        _print(create(conn, name=name))


@admin.command("create-city-key")
@click.argument("name")
def create_city_key(name: str) -> None:
    """Create a city client and print its API key (shown once)."""
    from services.common.principals import create_city_client

    with psycopg.connect(_database_url(), autocommit=True) as conn:
        _print(create_city_client(conn, name=name))


@admin.command("list-operators")
def list_operators() -> None:
    """List operators."""
    from services.common.principals import list_operators as list_all

    with psycopg.connect(_database_url(), autocommit=True) as conn:
        _print(list_all(conn))


@main.command()
@click.option("--seed/--no-seed", default=True, help="seed the demo lots on first start")
@click.option(
    "--feed/--no-feed",
    default=True,
    envvar="PARKING_DEMO_FEED",
    show_default=True,
    help="play the demo lots' sensors and gates (PARKING_DEMO_FEED=0: no)",
)
def up(seed: bool, feed: bool) -> None:
    """Run the whole local stack in the foreground; Ctrl-C stops it."""
    from services.common import devstack
    from services.common.migrate import migrate as apply
    from services.common.redis import connect
    from services.common.seed import seed_demo
    from services.ingestion.registry import sync_lots_to_redis

    started = time.monotonic()
    stop = threading.Event()  # ends the demo feed
    base = devstack.data_dir()
    env = dict(os.environ)
    env.update(devstack.ensure_secrets(base))
    servers = devstack.ensure_servers(base)
    try:
        env.update(
            DATABASE_URL=servers.database_url,
            REDIS_URL=servers.redis_url,
            PARKING_DATA_DIR=str(base),
            PARKING_METRICS_DIR=str(base / "metrics"),
            GATEWAY_PORT=env.get("GATEWAY_PORT", "8080"),
            PYTHONUNBUFFERED="1",
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        ports = {"INGESTION_PORT": 8081, "AVAILABILITY_PORT": 8082, "RESERVATIONS_PORT": 8083}
        for name, port in ports.items():
            env.setdefault(name, str(port))
        for name in ("ingestion", "availability", "reservations"):
            env.setdefault(
                f"PARKING_GATEWAY_{name.upper()}_URL",
                f"http://127.0.0.1:{env[f'{name.upper()}_PORT']}",
            )
        apply(servers.database_url)
        keys_file = base / "demo-keys.json"
        if seed:
            with psycopg.connect(servers.database_url, autocommit=True) as conn:
                if keys_file.exists():
                    demo = json.loads(keys_file.read_text())
                else:
                    demo = seed_demo(conn)
                    keys_file.write_text(json.dumps(demo, indent=2))
                    keys_file.chmod(0o600)
                sync_lots_to_redis(conn, connect(servers.redis_url, 5.0))
        else:
            demo = None
        url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        threading.Thread(
            target=_announce, args=(url, env, demo, started, stop, feed), daemon=True
        ).start()
        # honcho runs in a fresh, small interpreter: it forks a relay per process, and forks of
        # this process (which holds the embedded servers and their libraries) would cost more.
        supervisor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "honcho",
                "start",
                "-f",
                str(ROOT / "Procfile"),
                "-d",
                str(ROOT),
                "-e",
                os.devnull,
            ],
            env=env,
        )
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches honcho, which stops all
        signal.signal(signal.SIGTERM, lambda *_: supervisor.send_signal(signal.SIGTERM))
        code = supervisor.wait()
    finally:
        stop.set()
        servers.stop()
    sys.exit(code)


def _announce(
    url: str,
    env: dict[str, str],
    demo: dict[str, Any] | None,
    started: float,
    stop: threading.Event,
    feed: bool,
) -> None:
    """Print the gateway URL and the keys once every service answers ready; then, with ``feed``,
    play the devices of the demo's lots until ``stop``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:  # noqa: S310
                if resp.status == 200 and _services_ready(env):
                    break
        except OSError:
            pass
        time.sleep(0.25)
    else:
        click.echo("the gateway did not become ready within 120 s", err=True)
        return
    lines = [
        "",
        f"Smart parking platform ready in {time.monotonic() - started:.1f} s",
        f"  gateway:    {url}   (API docs: {url}/docs)",
        f"  admin key:  {env['PARKING_ADMIN_KEY']}",
    ]
    if demo:
        for op in demo["operators"]:
            lines.append(f"  operator:   {op['name']}: {op['api_key']}")
        lines.append(f"  city key:   {demo['city']['api_key']}")
    feed_keys = [op["api_key"] for op in demo["operators"]] if demo and feed else []
    if feed_keys:
        lines.append("  demo feed:  the demo lots' sensors and gates send events every 5 s")
    click.echo("\n".join(lines) + "\n")
    if feed_keys:
        from services.common.demofeed import DemoFeed

        DemoFeed(url, feed_keys).run(stop)


def _services_ready(env: dict[str, str]) -> bool:
    for name in ("INGESTION", "AVAILABILITY", "RESERVATIONS"):
        try:
            url = env[f"PARKING_GATEWAY_{name}_URL"] + "/readyz"
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310
                if resp.status != 200:
                    return False
        except OSError:
            return False
    return True


if __name__ == "__main__":
    main()
