"""``backup doctor [PLAN]``: check the plans against the live project (or ``make run``'s emulators) before the first
cron fires, and print what to fix as commands to copy (services/doctor.py)."""

from __future__ import annotations

import json
import socket

import click

from commands import current_runtime
from commands.errors import EXIT_FAILED, EXIT_USAGE, CliError

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


def _reachable(host: str) -> bool:
    address = host.removeprefix("http://").removeprefix("https://").rstrip("/")
    name, _, port = address.rpartition(":")
    try:
        with socket.create_connection((name or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _identity(rt, as_account: str | None, as_me: bool):  # type: ignore[no-untyped-def]
    """(credentials, identity, a finding when the service account could not be impersonated)."""
    from services import doctor

    own = rt.credentials()
    if as_me:
        return own, getattr(own, "service_account_email", None) or "your own credentials", None
    account = as_account or doctor.default_service_account(rt.settings.project)
    try:
        from google.auth import impersonated_credentials
        from google.auth.transport.requests import Request

        borrowed = impersonated_credentials.Credentials(
            source_credentials=own, target_principal=account, target_scopes=SCOPES, lifetime=600
        )
        borrowed.refresh(Request())
        return borrowed, account, None
    except Exception as exc:  # no token creator role, or the account does not exist
        fix = [
            f"gcloud iam service-accounts add-iam-policy-binding {account} --member=user:YOU@example.com"
            " --role=roles/iam.serviceAccountTokenCreator   (or run doctor with --as-me)"
        ]
        finding = doctor.Finding(
            "permissions",
            f"impersonate {account}",
            doctor.PROBLEM,
            f"could not act as the service account ({type(exc).__name__}); permissions below are your own",
            fix,
        )
        return own, getattr(own, "service_account_email", None) or "your own credentials", finding


def _print(report) -> None:  # type: ignore[no-untyped-def]
    click.echo(f"project {report.project}, permissions tested as {report.identity}")
    for finding in report.findings:
        mark = {"ok": "ok", "problem": "PROBLEM", "skipped": "skipped"}[finding.status]
        plans = f"  [{', '.join(finding.plans)}]" if finding.plans and finding.status != "ok" else ""
        click.echo(f"{mark:<8} {finding.check:<12} {finding.subject}: {finding.detail}{plans}")
        for command in finding.fix:
            click.echo(f"{'':<8} fix: {command}")
    problems = len(report.problems)
    if problems:
        click.echo(f"\n{problems} problem(s): run the fix commands above, then ./backup doctor again")
    else:
        click.echo("\nno problems found")


@click.command("doctor")
@click.argument("plan_name", required=False)
@click.option("--as", "as_account", default=None, help="Service account to test (default PROJECT@appspot...).")
@click.option("--as-me", is_flag=True, help="Test your own permissions instead of the service account's.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(plan_name: str | None, as_account: str | None, as_me: bool, as_json: bool) -> None:
    """Check every plan (or PLAN) against the live project and print the fixes."""
    from services import doctor

    rt = current_runtime()
    plans = list(rt.plans.values())
    if plan_name is not None:
        if plan_name not in rt.plans:
            raise CliError(f"no plan named {plan_name!r}; plans: {', '.join(sorted(rt.plans))}", EXIT_USAGE)
        plans = [rt.plans[plan_name]]
    if not rt.settings.on_app_engine and rt.secrets.env("DATASTORE_EMULATOR_HOST"):
        report = doctor.diagnose_local(rt, plans, _reachable)
    else:
        credentials, identity, impersonation = _identity(rt, as_account, as_me)
        apis = doctor.Apis(rt, credentials)
        account = as_account or doctor.default_service_account(rt.settings.project)
        report = doctor.diagnose(rt, plans, apis, identity, doctor.queues_in_use(plans), account)
        if impersonation is not None:
            report.findings.insert(0, impersonation)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print(report)
    if report.problems:
        raise click.exceptions.Exit(EXIT_FAILED)


commands = [doctor_command]
