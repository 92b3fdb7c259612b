"""Wire format of Titanic, declared in .proto files; generated modules live beside them."""
