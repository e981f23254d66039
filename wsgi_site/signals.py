"""
Keep sockets in step with HTTP sessions: record whose a session is; on logout and password
change, revoke outstanding tickets and end sockets.
"""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import SESSION_KEY, user_logged_out
from django.contrib.sessions.models import Session
from django.db.models.signals import post_save
from django.dispatch import receiver

from contract import tickets
from contract.groups import SESSION_EVENTS, session_end
from contract.layers import LAYER_ERRORS

from .models import UserSession

logger = logging.getLogger(__name__)


@receiver(post_save, sender=Session)
def record_session_user(sender, instance, **kwargs):
    # Every save of a logged-in session, login and key cycling (password change) included.
    user_id = instance.get_decoded().get(SESSION_KEY)
    if user_id is not None:
        UserSession.objects.update_or_create(session=instance, defaults={"user_id": user_id})


@receiver(user_logged_out)
def end_sockets_of_session(sender, request, user, **kwargs):
    if request is not None and request.session.session_key:
        end_sockets(session_end(session_key=request.session.session_key))


def end_sockets(event: dict) -> None:
    """
    Revoke the tickets still outstanding for what a session_end event (contract.groups)
    names, then send it: every Daphne process closes the sockets it names.
    """
    try:
        tickets.revoke(session=event.get("session"), user=event.get("user"))
    except LAYER_ERRORS as exc:
        # They expire within WS_TICKET_TTL; a socket one opens ends at its next re-check.
        logger.warning("tickets not revoked, Redis unreachable: %r", exc)
    try:
        async_to_sync(get_channel_layer().group_send)(SESSION_EVENTS, event)
    except LAYER_ERRORS as exc:
        # The logout itself stands; sockets end at their next re-check instead.
        logger.warning("sockets not told of logout, channel layer unreachable: %r", exc)


class EndSocketsOnPasswordChange:
    """
    A password "validator" that validates nothing: Django calls password_changed() on every
    validator after any password change is saved (form, admin, shell, reset), which is the
    moment every socket of the user must end. Django keeps the session that made the change
    logged in over HTTP, but cycles its key, so that session's sockets end too: its pages
    reconnect with a fresh ticket.
    """

    def validate(self, password, user=None):
        pass

    def password_changed(self, password, user=None):
        if user is not None and user.pk is not None:
            end_sockets(session_end(user=user.pk))

    def get_help_text(self):
        return ""
