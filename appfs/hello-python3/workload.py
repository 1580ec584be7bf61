"""hello (python3): the smallest function, answering like testguest's
built-in `hello`: {"name": "snapvm"} -> {"message": "hello, snapvm"}."""


def handle(request):
    name = request.get("name") if isinstance(request, dict) else None
    if not isinstance(name, str):
        name = "world"
    return {"message": f"hello, {name}"}
