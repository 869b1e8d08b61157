"""The server's routes by job, each module registering its own on the app with `add_routes(app, server)`."""
