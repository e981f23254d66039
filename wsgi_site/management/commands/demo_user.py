from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the demo user, or give it this password (local runs only)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("password")

    def handle(self, username, password, **options):
        user, created = get_user_model().objects.get_or_create(username=username)
        # Re-hashing an unchanged password would change the session auth hash and log the
        # user out everywhere, on every restart.
        if created or not user.check_password(password):
            user.set_password(password)
            user.save()
        self.stdout.write(f"{'created' if created else 'kept'} demo user {username!r}")
