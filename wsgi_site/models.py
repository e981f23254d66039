from django.conf import settings
from django.contrib.sessions.models import Session
from django.db import models


class UserSession(models.Model):
    """
    Which user a database session belongs to, so "log out everywhere" can find them all.
    Rows go with their session (CASCADE): logout, expiry cleanup and key cycling remove them.
    """

    session = models.OneToOneField(Session, on_delete=models.CASCADE, primary_key=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
