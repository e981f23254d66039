from django.apps import AppConfig


class WsgiSiteConfig(AppConfig):
    name = "wsgi_site"

    def ready(self):
        from . import signals  # noqa: F401
