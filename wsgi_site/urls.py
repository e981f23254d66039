from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("announce/", views.announce, name="announce"),
    path("healthz", views.healthz),
]
