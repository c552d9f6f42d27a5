"""File-share commands: ``backup restore-filestore`` and ``backup directory run|restore|verify``.

Directory copies run here in the foreground with a progress bar (the same engine a worker with the mount uses);
Filestore restores wait for the operation and always take a safety backup of the target share first.
Exit codes: 0 done; 1 the operation failed, stopped (disk full: the unfinished copy is removed), finished with
errors, or verify found problems (one line says why, no traceback); 2 bad usage.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from commands import current_runtime, quick_exit
from kinds.directory import copies as dircopy
from services.errors import BackupError


class _Bar:
    """Feeds engine Progress reports into a click progress bar sized by bytes, created on the first report
    (only then is the total known)."""

    def __init__(self, label: str):
        self.label = label
        self.bar: Any = None
        self.shown = 0

    def __call__(self, progress: dircopy.Progress) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=max(progress.bytes_total, 1), label=self.label, show_pos=False)
            self.bar.__enter__()
        step = progress.bytes_done - self.shown
        if step > 0:
            self.bar.update(step)
            self.shown = progress.bytes_done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _print_stats(stats: dircopy.CopyStats) -> None:
    click.echo(
        f"copied {stats.files_copied} files ({stats.bytes_copied} bytes), linked {stats.files_linked} unchanged,"
        f" {stats.files_deleted} deleted since the previous copy, {stats.symlinks} symlinks,"
        f" {stats.directories} directories, {stats.duration_seconds:.1f} s"
    )
    for note in stats.notes:
        click.echo(f"note: {dircopy._escape(note)}", err=True)
    for error in stats.errors:
        click.echo(f"error: {dircopy._escape(error)}", err=True)


@click.command("restore-filestore")
@click.option("--backup", required=True, help="Backup name: projects/P/locations/REGION/backups/ID.")
@click.option("--instance", required=True, help="Target instance: projects/P/locations/L/instances/ID.")
@click.option("--share", required=True, help="File share on the target instance to overwrite.")
@click.option("--endpoint", default=None, help="Filestore API endpoint (default: BACKUP_FILE_ENDPOINT or Google's).")
@click.option("--timeout", default=3 * 3600.0, show_default=True, help="Seconds to wait for backup and restore.")
def restore_filestore_command(backup: str, instance: str, share: str, endpoint: str | None, timeout: float) -> None:
    """Restore BACKUP onto SHARE of INSTANCE, after taking a safety backup of that share."""
    from kinds.filestore.restore import restore_filestore

    rt = current_runtime()
    try:
        result = restore_filestore(
            rt,
            backup=backup,
            instance=instance,
            share=share,
            endpoint=endpoint,
            timeout_seconds=timeout,
            on_progress=click.echo,
        )
    except BackupError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"restored {result.backup} onto {result.instance} share {result.share}")
    click.echo(f"the share's previous content is in safety backup {result.safety_backup}")


@click.group("directory")
def directory_group() -> None:
    """Timestamped directory copies: run one, verify one against its manifest, restore one."""


@directory_group.command("run")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.argument("dest", required=False)
@click.option("--plan", "plan_name", default=None, help="Run every source of this plan instead of SOURCE DEST.")
@click.option("--keep", type=click.IntRange(min=1), default=None, help="Keep this many complete copies (ad hoc).")
@click.option("--min-keep", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1, 64), default=dircopy.DEFAULT_THREADS, show_default=True)
@click.option(
    "--walkers",
    type=click.IntRange(1, 16),
    default=dircopy.WALKERS,
    show_default=True,
    help="Threads walking the source (more for NFS, where each lstat waits on the server).",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 16),
    default=dircopy.CLI_PROCESSES,
    show_default=True,
    help="Processes sharing the walk of a local copy (this one and forked workers, as rsync runs two).",
)
@click.option("--no-sync", is_flag=True, help="Skip the file-system flush before the copy is marked complete.")
def directory_run(
    source: Path | None,
    dest: str | None,
    plan_name: str | None,
    keep: int | None,
    min_keep: int,
    threads: int,
    walkers: int,
    processes: int,
    no_sync: bool,
) -> None:
    """Copy SOURCE into DEST/<UTC timestamp>/ (DEST a folder or gs://BUCKET/PREFIX), reusing unchanged files."""
    rt = current_runtime()
    if plan_name:
        if source or dest:
            raise click.UsageError("give either --plan or SOURCE DEST, not both")
        _run_plan(rt, plan_name)
        return
    if source is None or dest is None:
        raise click.UsageError("SOURCE and DEST are required (or --plan NAME)")
    if dest.startswith("gs://"):
        _run_to_bucket(rt, source, dest, keep, min_keep, threads)
        return
    bar = _Bar(f"copying {source}")
    quick_exit()
    try:
        result = dircopy.copy_tree(
            source,
            Path(dest),
            rt.now(),
            threads=threads,
            walkers=walkers,
            processes=processes,
            sync=not no_sync,
            on_progress=bar,
            progress_every=0.2,
            clock=rt.now,
            ad_hoc=True,
        )
    except (dircopy.CopyError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    click.echo(f"copy: {result.path}" + (f" (linked against {result.previous.name})" if result.previous else ""))
    _print_stats(result.stats)
    if result.stats.errors:
        raise click.ClickException(f"{len(result.stats.errors)} errors (see {result.path / dircopy.LOG_NAME})")
    if keep is not None:
        try:
            for path in dircopy.prune(Path(dest), keep, min_keep):
                click.echo(f"retention: deleted {path}")
        except (dircopy.CopyError, OSError) as exc:
            raise click.ClickException(f"retention: {exc}") from exc


def _run_to_bucket(rt: Any, source: Path, dest: str, keep: int | None, min_keep: int, threads: int) -> None:
    from google.api_core.exceptions import GoogleAPIError

    from kinds.directory import bucket as gcscopy

    client = rt.storage()
    try:
        result = gcscopy.copy_tree_to_bucket(source, client, dest, rt.now(), threads=threads, ad_hoc=True)
    except (dircopy.CopyError, OSError, ValueError, GoogleAPIError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"copy: {result.url}" + (f" (reusing objects of {result.previous})" if result.previous else ""))
    _print_stats(result.stats)
    cost = result.cost
    click.echo(
        f"cost: {cost.requests} requests, {cost.objects_written} objects written, {cost.bytes_uploaded} bytes uploaded"
    )
    if result.stats.errors:
        raise click.ClickException(f"{len(result.stats.errors)} errors (listed above and in the copy's log)")
    if keep is not None:
        pruned = gcscopy.prune_bucket_copies(client, dest, keep, min_keep)
        for url in pruned.deleted:
            click.echo(f"retention: deleted {url}")


def _run_plan(rt: Any, plan_name: str) -> None:
    from kinds.directory import kind as directory
    from services.jobs import drive
    from services.kinds import RunContext

    plan = rt.plans.get(plan_name)
    if plan is None or plan.kind != "directory":
        raise click.ClickException(f"no directory plan called {plan_name!r} in {rt.settings.plans_path}")
    period = rt.now().astimezone(UTC).replace(microsecond=0)
    failures = 0
    for target in directory.KIND.enumerate(plan, None, rt).targets:
        run = RunContext(run_id=f"cli-{period:%Y%m%dT%H%M%S}", plan=plan.name, target_key=target.key, period=period)
        run.on_log = click.echo
        try:
            outcome = drive(directory.KIND, plan, target, run, rt)
        except BackupError as exc:
            failures += 1
            click.echo(f"{target.key}: FAILED: {exc}", err=True)
            continue
        click.echo(f"{target.key}: {outcome.message}")
    if failures:
        raise click.ClickException(f"{failures} of the plan's sources failed")


@directory_group.command("verify")
@click.argument("copy")
@click.option("--threads", type=click.IntRange(1, 64), default=dircopy.DEFAULT_THREADS, show_default=True)
def directory_verify(copy: str, threads: int) -> None:
    """Re-read every file of COPY (a DEST/<timestamp> folder or gs://BUCKET/PREFIX/<timestamp>) and compare it
    with the copy's manifest; also report what the run that made it could not copy."""
    bar = _Bar(f"verifying {copy}")
    try:
        if copy.startswith("gs://"):
            from kinds.directory import bucket as gcscopy

            report = gcscopy.verify_bucket_copy(current_runtime().storage(), copy, threads=threads)
        else:
            report = dircopy.verify_copy(Path(copy), threads=threads, on_progress=bar)
    except (dircopy.CopyError, OSError, ValueError) as exc:  # ValueError: a malformed gs:// URL
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    for problem in report.problems:
        click.echo(f"problem: {problem}", err=True)
    for error in report.recorded_errors:
        click.echo(f"left out when the copy was made: {dircopy._escape(error)}", err=True)
    if not report.ok:
        found = len(report.problems) + len(report.recorded_errors)
        raise click.ClickException(f"{copy}: {found} problems found")
    click.echo(f"{copy}: OK, {report.files_checked} files ({report.bytes_checked} bytes) match the manifest")


@directory_group.command("restore")
@click.argument("copy")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--path", "subpath", default=None, help="Restore only this directory of the copy (relative path).")
@click.option("--overwrite", is_flag=True, help="Restore into a non-empty TARGET, after a safety copy of it.")
@click.option(
    "--safety-dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the safety copy goes (default: DEST/.safety-copies beside a local copy; required for gs://).",
)
@click.option("--threads", type=click.IntRange(1, 64), default=dircopy.DEFAULT_THREADS, show_default=True)
def directory_restore(
    copy: str, target: Path, subpath: str | None, overwrite: bool, safety_dest: Path | None, threads: int
) -> None:
    """Restore COPY (a DEST/<timestamp> folder or gs://BUCKET/PREFIX/<timestamp>) into TARGET, checking every
    file against the manifest."""
    bar = _Bar(f"restoring {copy}")
    try:
        if copy.startswith("gs://"):
            from kinds.directory import bucket as gcscopy

            result = gcscopy.restore_bucket_copy(
                current_runtime().storage(),
                copy,
                target,
                subpath=subpath,
                overwrite=overwrite,
                safety_dest=safety_dest,
                threads=threads,
                on_progress=bar,
            )
        else:
            if not Path(copy).is_dir():
                raise click.UsageError(f"COPY {copy} is not a directory")
            result = dircopy.restore_copy(
                Path(copy),
                target,
                subpath=subpath,
                overwrite=overwrite,
                safety_dest=safety_dest,
                when=datetime.now(UTC),
                threads=threads,
                on_progress=bar,
            )
    except (dircopy.CopyError, OSError, ValueError) as exc:  # ValueError: a malformed gs:// URL
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    _report_restore(result, target)


def _report_restore(result: dircopy.RestoreResult, target: Path) -> None:
    if result.safety_copy:
        click.echo(f"safety copy of {target} before overwriting: {result.safety_copy}")
    click.echo(
        f"restored {result.files} files ({result.bytes} bytes), {result.symlinks} symlinks,"
        f" {result.specials} special files, {result.directories} directories into {target}"
    )
    for replaced in result.replaced:
        click.echo(f"replaced: {replaced}")
    for error in result.errors:
        click.echo(f"error: {error}", err=True)
    if result.errors:
        raise click.ClickException(f"{len(result.errors)} entries could not be restored")


commands = [restore_filestore_command, directory_group]
