from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/logout-everywhere/", views.logout_everywhere, name="logout-everywhere"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("ws-ticket/", views.ws_ticket, name="ws-ticket"),
    path("announce/", views.announce, name="announce"),
    path("healthz", views.healthz),
]
