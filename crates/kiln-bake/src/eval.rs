//! Evaluation of HCL expressions as bake files use them, over hcl-rs's syntax tree: values are
//! JSON values; variables resolve lazily (a variable's default may use another), with cycles
//! reported by their chain; functions come from [`crate::functions`].

use std::collections::{BTreeMap, HashMap};

use hcl::expr::{BinaryOperator, Expression, ObjectKey, Operation, TemplateExpr, TraversalOperator, UnaryOperator};
use hcl::template::{Directive, Element, Template};
use serde_json::{Map, Number, Value};

/// What a variable is: its default expression, or a value given from outside.
#[derive(Debug, Clone)]
pub enum Source {
    /// `variable "NAME" { default = EXPR }` (or a top-level attribute).
    Expr(Expression),
    /// An environment override, typed like the default when the default is a bool or number.
    Env(String, Option<Expression>),
}

/// A `function` block: its parameters (the last one variadic, when given) and its result.
#[derive(Debug, Clone)]
pub struct Function {
    /// The parameters' names.
    pub params: Vec<String>,
    /// The variadic parameter's name: the remaining arguments, as a list.
    pub variadic: Option<String>,
    /// The result.
    pub result: Expression,
}

/// How deep user functions may call each other (a function calling itself forever stops
/// here with an error).
const MAX_CALL_DEPTH: usize = 64;

/// The global scope: bake variables, resolved on first use, and user functions.
#[derive(Default)]
pub struct Scope {
    sources: HashMap<String, Source>,
    resolved: HashMap<String, Value>,
    /// The variables being resolved now, innermost last (for cycle chains).
    resolving: Vec<String>,
    functions: HashMap<String, Function>,
    depth: usize,
}

impl Scope {
    /// Declares a variable.
    pub fn declare(&mut self, name: &str, source: Source) {
        self.sources.insert(name.to_string(), source);
    }

    /// Declares a user function (over a standard one of the same name).
    pub fn declare_function(&mut self, name: &str, function: Function) {
        self.functions.insert(name.to_string(), function);
    }

    /// Calls the user function `name` (its result sees its parameters and the variables).
    fn call_user(&mut self, name: &str, function: Function, mut args: Vec<Value>) -> Result<Value, String> {
        let fixed = function.params.len();
        if args.len() < fixed || (function.variadic.is_none() && args.len() > fixed) {
            let more = if function.variadic.is_some() { " or more" } else { "" };
            let plural = if fixed == 1 { "" } else { "s" };
            return Err(format!("{name}(): takes {fixed} argument{plural}{more}, not {}", args.len()));
        }
        if self.depth >= MAX_CALL_DEPTH {
            return Err(format!("{name}(): calls nest deeper than {MAX_CALL_DEPTH}"));
        }
        let rest = args.split_off(fixed);
        let mut locals = Locals::default();
        for (param, arg) in function.params.iter().zip(args) {
            locals.set(param, arg);
        }
        if let Some(variadic) = &function.variadic {
            locals.set(variadic, Value::Array(rest));
        }
        self.depth += 1;
        let result = self.eval(&function.result, &locals).map_err(|e| format!("{name}(): {e}"));
        self.depth -= 1;
        result
    }

    /// The variable's value.
    pub fn variable(&mut self, name: &str) -> Result<Value, String> {
        if let Some(value) = self.resolved.get(name) {
            return Ok(value.clone());
        }
        let Some(source) = self.sources.get(name).cloned() else {
            return Err(format!("unknown variable {name}"));
        };
        if let Some(at) = self.resolving.iter().position(|v| v == name) {
            let mut chain = self.resolving[at..].to_vec();
            chain.push(name.to_string());
            return Err(format!("variable cycle: {}", chain.join(" -> ")));
        }
        self.resolving.push(name.to_string());
        let value = match source {
            Source::Expr(expr) => self.eval(&expr, &Locals::default()),
            Source::Env(text, default) => match default {
                Some(default) => self.eval(&default, &Locals::default()).map(|d| typed_like(&d, text)),
                None => Ok(Value::String(text)),
            },
        };
        self.resolving.pop();
        let value = value.map_err(|e| format!("variable {name}: {e}"))?;
        self.resolved.insert(name.to_string(), value.clone());
        Ok(value)
    }

    /// Evaluates `expr` with `locals` (matrix values, function parameters, `for` variables)
    /// over the variables.
    pub fn eval(&mut self, expr: &Expression, locals: &Locals) -> Result<Value, String> {
        match expr {
            Expression::Null => Ok(Value::Null),
            Expression::Bool(b) => Ok(Value::Bool(*b)),
            Expression::Number(n) => Ok(number(n.as_f64().unwrap_or(0.0))),
            Expression::String(s) => Ok(Value::String(s.clone())),
            Expression::Array(items) => {
                items.iter().map(|e| self.eval(e, locals)).collect::<Result<_, _>>().map(Value::Array)
            }
            Expression::Object(object) => {
                let mut map = Map::new();
                for (key, value) in object {
                    let key = match key {
                        ObjectKey::Identifier(id) => id.to_string(),
                        ObjectKey::Expression(e) => text_of(&self.eval(e, locals)?)?,
                        other => return Err(format!("unsupported object key {other:?}")),
                    };
                    map.insert(key, self.eval(value, locals)?);
                }
                Ok(Value::Object(map))
            }
            Expression::TemplateExpr(template) => {
                let source = match template.as_ref() {
                    TemplateExpr::QuotedString(raw) => raw.clone(),
                    TemplateExpr::Heredoc(heredoc) => heredoc.template.clone(),
                };
                crate::nesting::check(&source, true).map_err(|(_, e)| format!("template {source:?}: {e}"))?;
                let template: Template = source.parse().map_err(|e: hcl::Error| format!("template {source:?}: {e}"))?;
                // A template that is one interpolation keeps its value's type ("${true}").
                if let [Element::Interpolation(only)] = template.elements() {
                    return self.eval(&only.expr, locals);
                }
                self.render(&template, locals).map(Value::String)
            }
            Expression::Variable(variable) => match locals.get(variable.as_str()) {
                Some(value) => Ok(value.clone()),
                None => self.variable(variable.as_str()),
            },
            Expression::Traversal(traversal) => {
                let mut value = self.eval(&traversal.expr, locals)?;
                for operator in &traversal.operators {
                    value = match operator {
                        TraversalOperator::GetAttr(name) => match &value {
                            Value::Object(map) => map
                                .get(name.as_str())
                                .cloned()
                                .ok_or_else(|| format!("no attribute {name} in {value}"))?,
                            other => return Err(format!("{other} has no attribute {name}")),
                        },
                        TraversalOperator::Index(index) => {
                            let index = self.eval(index, locals)?;
                            element(&value, &index)?
                        }
                        TraversalOperator::LegacyIndex(index) => element(&value, &Value::from(*index))?,
                        other => return Err(format!("{other:?} is not supported in bake files")),
                    };
                }
                Ok(value)
            }
            // `try` and `can` see their arguments' errors: they evaluate them themselves.
            Expression::FuncCall(call) if call.name.name.as_str() == "try" => {
                let mut last = "try(): takes at least one argument".to_string();
                for arg in &call.args {
                    match self.eval(arg, locals) {
                        Ok(value) => return Ok(value),
                        Err(error) => last = error,
                    }
                }
                Err(format!("try(): no argument evaluates; the last: {last}"))
            }
            Expression::FuncCall(call) if call.name.name.as_str() == "can" => match call.args.as_slice() {
                [arg] => Ok(Value::Bool(self.eval(arg, locals).is_ok())),
                _ => Err("can(): takes one argument".into()),
            },
            Expression::FuncCall(call) => {
                let mut args = Vec::with_capacity(call.args.len());
                for arg in &call.args {
                    args.push(self.eval(arg, locals)?);
                }
                if call.expand_final {
                    match args.pop() {
                        Some(Value::Array(rest)) => args.extend(rest),
                        _ => return Err(format!("{}(...): the last argument must be a list", call.name.name)),
                    }
                }
                let name = call.name.name.as_str();
                match self.functions.get(name).cloned() {
                    Some(function) => self.call_user(name, function, args),
                    None => crate::functions::call(name, args),
                }
            }
            Expression::Parenthesis(inner) => self.eval(inner, locals),
            Expression::Conditional(conditional) => match self.eval(&conditional.cond_expr, locals)? {
                Value::Bool(true) => self.eval(&conditional.true_expr, locals),
                Value::Bool(false) => self.eval(&conditional.false_expr, locals),
                other => Err(format!("a condition must be true or false, not {other}")),
            },
            Expression::Operation(operation) => match operation.as_ref() {
                Operation::Unary(unary) => {
                    let value = self.eval(&unary.expr, locals)?;
                    match (unary.operator, value) {
                        (UnaryOperator::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
                        (UnaryOperator::Neg, Value::Number(n)) => Ok(number(-n.as_f64().unwrap_or(0.0))),
                        (operator, value) => Err(format!("{operator:?} does not apply to {value}")),
                    }
                }
                Operation::Binary(binary) => {
                    let lhs = self.eval(&binary.lhs_expr, locals)?;
                    // `&&` and `||` look at their right side only when they need it.
                    match (binary.operator, &lhs) {
                        (BinaryOperator::And, Value::Bool(false)) => return Ok(Value::Bool(false)),
                        (BinaryOperator::Or, Value::Bool(true)) => return Ok(Value::Bool(true)),
                        _ => {}
                    }
                    let rhs = self.eval(&binary.rhs_expr, locals)?;
                    binary_op(binary.operator, lhs, rhs)
                }
            },
            Expression::ForExpr(for_expr) => {
                let collection = self.eval(&for_expr.collection_expr, locals)?;
                let items: Vec<(Value, Value)> = match collection {
                    Value::Array(items) => items.into_iter().enumerate().map(|(i, v)| (Value::from(i), v)).collect(),
                    Value::Object(map) => map.into_iter().map(|(k, v)| (Value::String(k), v)).collect(),
                    other => return Err(format!("for: {other} is not a list or an object")),
                };
                let mut list = Vec::new();
                let mut object: Map<String, Value> = Map::new();
                for (key, value) in items {
                    let mut scope = locals.clone();
                    if let Some(key_var) = &for_expr.key_var {
                        scope.set(key_var.as_str(), key);
                    }
                    scope.set(for_expr.value_var.as_str(), value);
                    if let Some(cond) = &for_expr.cond_expr {
                        match self.eval(cond, &scope)? {
                            Value::Bool(true) => {}
                            Value::Bool(false) => continue,
                            other => return Err(format!("for: a condition must be true or false, not {other}")),
                        }
                    }
                    let value = self.eval(&for_expr.value_expr, &scope)?;
                    match &for_expr.key_expr {
                        Some(key_expr) => {
                            let key = text_of(&self.eval(key_expr, &scope)?)?;
                            if for_expr.grouping {
                                match object.entry(key).or_insert_with(|| Value::Array(Vec::new())) {
                                    Value::Array(group) => group.push(value),
                                    _ => unreachable!("grouped values are lists"),
                                }
                            } else if object.insert(key.clone(), value).is_some() {
                                return Err(format!("for: the key {key:?} comes twice (group with ...)"));
                            }
                        }
                        None => list.push(value),
                    }
                }
                Ok(if for_expr.key_expr.is_some() { Value::Object(object) } else { Value::Array(list) })
            }
            other => Err(format!("unsupported expression {other:?}")),
        }
    }

    /// A template's text.
    fn render(&mut self, template: &Template, locals: &Locals) -> Result<String, String> {
        let mut out = String::new();
        for element in template.elements() {
            match element {
                Element::Literal(text) => out.push_str(text),
                Element::Interpolation(interpolation) => {
                    out.push_str(&text_of(&self.eval(&interpolation.expr, locals)?)?)
                }
                Element::Directive(directive) => match directive.as_ref() {
                    Directive::If(if_directive) => match self.eval(&if_directive.cond_expr, locals)? {
                        Value::Bool(true) => out.push_str(&self.render(&if_directive.true_template, locals)?),
                        Value::Bool(false) => {
                            if let Some(template) = &if_directive.false_template {
                                out.push_str(&self.render(template, locals)?);
                            }
                        }
                        other => return Err(format!("%{{if}}: a condition must be true or false, not {other}")),
                    },
                    Directive::For(for_directive) => {
                        let items: Vec<(Value, Value)> = match self.eval(&for_directive.collection_expr, locals)? {
                            Value::Array(items) => {
                                items.into_iter().enumerate().map(|(i, v)| (Value::from(i), v)).collect()
                            }
                            Value::Object(map) => map.into_iter().map(|(k, v)| (Value::String(k), v)).collect(),
                            other => return Err(format!("%{{for}}: {other} is not a list or an object")),
                        };
                        for (key, value) in items {
                            let mut scope = locals.clone();
                            if let Some(key_var) = &for_directive.key_var {
                                scope.set(key_var.as_str(), key);
                            }
                            scope.set(for_directive.value_var.as_str(), value);
                            out.push_str(&self.render(&for_directive.template, &scope)?);
                        }
                    }
                },
            }
        }
        Ok(out)
    }
}

/// Values bound by name inside an expression: a matrix's, a function's parameters, `for`
/// variables.
#[derive(Debug, Clone, Default)]
pub struct Locals(BTreeMap<String, Value>);

impl Locals {
    /// Binds `name`.
    pub fn set(&mut self, name: &str, value: Value) {
        self.0.insert(name.to_string(), value);
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }
}

/// A number as JSON has it: an integer when it is one.
pub fn number(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        Value::from(value as i64)
    } else {
        Number::from_f64(value).map_or(Value::Null, Value::Number)
    }
}

/// A value as a string where a string is expected (templates, keys, function arguments).
pub fn text_of(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Null => Err("null where a string is expected".into()),
        other => Err(format!("{other} where a string is expected")),
    }
}

/// An environment override typed like the default: a bool or number default parses it as
/// one (a text that does not parse stays text).
fn typed_like(default: &Value, text: String) -> Value {
    match default {
        Value::Bool(_) => text.parse::<bool>().map_or(Value::String(text), Value::Bool),
        Value::Number(_) => text.parse::<f64>().map_or(Value::String(text), number),
        _ => Value::String(text),
    }
}

fn element(value: &Value, index: &Value) -> Result<Value, String> {
    match (value, index) {
        (Value::Array(items), Value::Number(n)) => n
            .as_u64()
            .and_then(|i| items.get(i as usize))
            .cloned()
            .ok_or_else(|| format!("index {n} is out of range (length {})", items.len())),
        (Value::Object(map), key) => {
            let key = text_of(key)?;
            map.get(&key).cloned().ok_or_else(|| format!("no key {key:?}"))
        }
        (value, index) => Err(format!("{value} cannot be indexed by {index}")),
    }
}

fn binary_op(operator: BinaryOperator, lhs: Value, rhs: Value) -> Result<Value, String> {
    use BinaryOperator::*;
    let numbers = |lhs: &Value, rhs: &Value| match (lhs.as_f64(), rhs.as_f64()) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(format!("{operator:?} needs numbers, not {lhs} and {rhs}")),
    };
    Ok(match operator {
        Eq => Value::Bool(lhs == rhs),
        NotEq => Value::Bool(lhs != rhs),
        And | Or => match (lhs, rhs) {
            (Value::Bool(a), Value::Bool(b)) => Value::Bool(if operator == And { a && b } else { a || b }),
            (lhs, rhs) => return Err(format!("{operator:?} needs true or false, not {lhs} and {rhs}")),
        },
        Less | LessEq | Greater | GreaterEq => {
            let (a, b) = numbers(&lhs, &rhs)?;
            Value::Bool(match operator {
                Less => a < b,
                LessEq => a <= b,
                Greater => a > b,
                _ => a >= b,
            })
        }
        Plus | Minus | Mul | Div | Mod => {
            let (a, b) = numbers(&lhs, &rhs)?;
            if matches!(operator, Div | Mod) && b == 0.0 {
                return Err("division by zero".into());
            }
            number(match operator {
                Plus => a + b,
                Minus => a - b,
                Mul => a * b,
                Div => a / b,
                _ => a % b,
            })
        }
    })
}
