"""The search service's routes, one `APIRouter` per concern; flows/web/app.py includes them."""
