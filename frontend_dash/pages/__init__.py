"""Dashboard pages: each module registers itself with `dash.register_page` and owns its callbacks.

They are imported by `frontend_dash.app.create_dash_app` after the Dash app exists.
"""
