"""``backup restore-disk``: make a new persistent disk from one of the snapshots this service took.

A restore never touches the disk the snapshot came from and never reuses an existing disk name, so running it
cannot destroy data; attaching the new disk to an instance is left to the operator.
"""

from __future__ import annotations

import click

from commands import current_runtime
from kinds.disks.restore import restore_disk
from kinds.disks.snapshots import GCE_NAME
from services.errors import BackupError


def _disk_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not GCE_NAME.match(value):
        raise click.BadParameter(f"{value!r} is not a disk name (1-63 lowercase letters, digits and '-')")
    return value


@click.command("restore-disk")
@click.option("--snapshot", required=True, help="Snapshot name (as listed by `gcloud compute snapshots list`).")
@click.option("--zone", required=True, help="Zone of the new disk, e.g. europe-west1-b.")
@click.option(
    "--name", "new_disk", required=True, callback=_disk_name, help="Name of the new disk; must not exist yet."
)
@click.option("--project", default=None, help="Project of the snapshot and new disk (default: BACKUP_PROJECT).")
@click.option("--type", "disk_type", default=None, help="Disk type of the new disk, e.g. pd-ssd (default: Compute's).")
@click.option("--endpoint", default=None, help="Compute API endpoint (default: BACKUP_COMPUTE_ENDPOINT or Google's).")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait for the disk to be READY.")
def restore_disk_command(
    snapshot: str,
    zone: str,
    new_disk: str,
    project: str | None,
    disk_type: str | None,
    endpoint: str | None,
    timeout: float,
) -> None:
    """Create disk NAME in ZONE from SNAPSHOT and wait until it is READY."""
    rt = current_runtime()
    project = project or rt.settings.project
    try:
        restored = restore_disk(
            rt,
            project=project,
            zone=zone,
            snapshot=snapshot,
            name=new_disk,
            disk_type=disk_type,
            endpoint=endpoint,
            timeout_seconds=timeout,
            on_progress=click.echo,
        )
    except BackupError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"restored: {restored.self_link or restored.name} ({restored.size_gb} GB, {restored.status})")
    click.echo(f"attach it with: gcloud compute instances attach-disk INSTANCE --disk {restored.name} --zone {zone}")


commands = [restore_disk_command]
