{{- define "keyward.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyward.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "keyward.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Where the TLS files are mounted. */}}
{{- define "keyward.tlsDir" -}}/etc/keyward/tls{{- end -}}

{{/* The API port's name: https, or http with allowPlaintext. */}}
{{- define "keyward.apiPortName" -}}
{{- if .Values.tls.secretName -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/*
Refuses combinations that Keyward would refuse at start, with a message that
says what to set, so that a bad release fails at `helm install`, not in a
crash loop.
*/}}
{{- define "keyward.validate" -}}
{{- $tls := .Values.tls -}}
{{- if and $tls.secretName .Values.allowPlaintext -}}
{{- fail "keyward: set either tls.secretName (Keyward serves TLS) or allowPlaintext=true (a proxy in front terminates TLS), not both" -}}
{{- end -}}
{{- if not (or $tls.secretName .Values.allowPlaintext) -}}
{{- fail "keyward: Keyward refuses plain HTTP on a pod address. Set tls.secretName to a kubernetes.io/tls Secret (tls.crt, tls.key), or allowPlaintext=true only behind a proxy or mesh that terminates TLS" -}}
{{- end -}}
{{- if and $tls.clientCa.secretName (not $tls.secretName) -}}
{{- fail "keyward: tls.clientCa (mutual TLS) needs tls.secretName as well" -}}
{{- end -}}
{{- if and $tls.clientCrl.secretName (not $tls.clientCa.secretName) -}}
{{- fail "keyward: tls.clientCrl needs tls.clientCa.secretName: CRLs apply to client certificates" -}}
{{- end -}}
{{- $provider := .Values.masterKeyProvider -}}
{{- if not (has $provider (list "env" "azure-key-vault" "tpm")) -}}
{{- fail (printf "keyward: masterKeyProvider `%s` is not wired by this chart: use env, azure-key-vault or tpm" $provider) -}}
{{- end -}}
{{- if eq $provider "azure-key-vault" -}}
{{- if not (and .Values.azure.vaultUrl .Values.azure.key) -}}
{{- fail "keyward: masterKeyProvider=azure-key-vault needs azure.vaultUrl (https://NAME.vault.azure.net) and azure.key (the key's name)" -}}
{{- end -}}
{{- if not .Values.azure.workloadIdentity.clientId -}}
{{- fail "keyward: masterKeyProvider=azure-key-vault uses AKS workload identity: set azure.workloadIdentity.clientId to the managed identity's client id (federated with this release's service account)" -}}
{{- end -}}
{{- end -}}
{{- if and (eq $provider "tpm") (gt (int .Values.replicaCount) 1) -}}
{{- fail "keyward: masterKeyProvider=tpm seals the master key to one machine's TPM; replicas on other nodes cannot unseal it. Set replicaCount=1 (docs/master-keys.md, TPM 2.0)" -}}
{{- end -}}
{{- if and (eq $provider "tpm") (not (or .Values.tpm.deviceResource .Values.tpm.hostDevice)) -}}
{{- fail "keyward: masterKeyProvider=tpm needs the TPM device in the pod: tpm.deviceResource (a device plugin's resource) or tpm.hostDevice=true" -}}
{{- end -}}
{{- end -}}

{{/* The service account's name with the azure-key-vault provider. */}}
{{- define "keyward.serviceAccountName" -}}
{{- default (include "keyward.fullname" .) .Values.azure.serviceAccount.name -}}
{{- end -}}
