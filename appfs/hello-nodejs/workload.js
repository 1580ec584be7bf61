'use strict';
// hello (nodejs): the smallest function, answering like testguest's
// built-in `hello`: {"name": "snapvm"} -> {"message": "hello, snapvm"}.

exports.handle = (request) => {
  const name = request !== null && typeof request === 'object' && typeof request.name === 'string'
    ? request.name
    : 'world';
  return { message: `hello, ${name}` };
};
