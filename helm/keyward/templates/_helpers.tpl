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
{{- $mk := .Values.masterKey -}}
{{- if not (has $mk.provider (list "env" "aws-kms" "vault" "pkcs11" "azure-key-vault" "tpm")) -}}
{{- fail "keyward: masterKey.provider must be env, aws-kms, vault, pkcs11, azure-key-vault or tpm" -}}
{{- end -}}
{{- if eq $mk.provider "aws-kms" -}}
{{- if not (and $mk.awsKms.keyId $mk.awsKms.region) -}}
{{- fail "keyward: masterKey.provider aws-kms needs masterKey.awsKms.keyId and masterKey.awsKms.region" -}}
{{- end -}}
{{- end -}}
{{- if eq $mk.provider "vault" -}}
{{- if not (and $mk.vault.addr $mk.vault.transitKey) -}}
{{- fail "keyward: masterKey.provider vault needs masterKey.vault.addr and masterKey.vault.transitKey" -}}
{{- end -}}
{{- if eq (not $mk.vault.tokenSecret.name) (not (and $mk.vault.roleId $mk.vault.secretIdSecret.name)) -}}
{{- fail "keyward: masterKey.provider vault needs either masterKey.vault.tokenSecret.name, or masterKey.vault.roleId and masterKey.vault.secretIdSecret.name (AppRole)" -}}
{{- end -}}
{{- end -}}
{{- if eq $mk.provider "pkcs11" -}}
{{- if not (and $mk.pkcs11.moduleVolume $mk.pkcs11.modulePath $mk.pkcs11.keyLabel $mk.pkcs11.pinSecret.name) -}}
{{- fail "keyward: masterKey.provider pkcs11 needs masterKey.pkcs11.moduleVolume, modulePath, keyLabel and pinSecret.name" -}}
{{- end -}}
{{- if eq (not $mk.pkcs11.tokenLabel) (not $mk.pkcs11.slot) -}}
{{- fail "keyward: masterKey.provider pkcs11 needs either masterKey.pkcs11.tokenLabel or masterKey.pkcs11.slot" -}}
{{- end -}}
{{- end -}}
{{- if eq $mk.provider "azure-key-vault" -}}
{{- if not (and $mk.azure.vaultUrl $mk.azure.key) -}}
{{- fail "keyward: masterKey.provider azure-key-vault needs masterKey.azure.vaultUrl (https://NAME.vault.azure.net) and masterKey.azure.key (the key's name)" -}}
{{- end -}}
{{- if not (has $mk.azure.algorithm (list "RSA-OAEP-256" "A256KW")) -}}
{{- fail "keyward: masterKey.azure.algorithm must be RSA-OAEP-256 (an RSA key) or A256KW (a Managed HSM AES key)" -}}
{{- end -}}
{{- if and $mk.azure.workloadIdentity.createServiceAccount (not $mk.azure.workloadIdentity.clientId) -}}
{{- fail "keyward: masterKey.provider azure-key-vault uses AKS workload identity: set masterKey.azure.workloadIdentity.clientId to the managed identity's client id (federated with this release's ServiceAccount)" -}}
{{- end -}}
{{- if and (not $mk.azure.workloadIdentity.createServiceAccount) (not .Values.serviceAccountName) -}}
{{- fail "keyward: masterKey.azure.workloadIdentity.createServiceAccount=false needs serviceAccountName: an existing ServiceAccount annotated with azure.workload.identity/client-id" -}}
{{- end -}}
{{- end -}}
{{- if eq $mk.provider "tpm" -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- fail "keyward: masterKey.provider tpm seals the master key to one machine's TPM; replicas on other nodes cannot unseal it. Set replicaCount=1 (docs/master-keys.md, TPM 2.0)" -}}
{{- end -}}
{{- if not $mk.tpm.tcti -}}
{{- fail "keyward: masterKey.provider tpm needs masterKey.tpm.tcti (e.g. device:/dev/tpmrm0)" -}}
{{- end -}}
{{- if not $mk.tpm.nodeSelector -}}
{{- fail "keyward: masterKey.provider tpm needs masterKey.tpm.nodeSelector naming the node whose TPM sealed the key (e.g. kubernetes.io/hostname: NODE)" -}}
{{- end -}}
{{- if and (hasPrefix "device:" $mk.tpm.tcti) (not (or $mk.tpm.deviceResource $mk.tpm.hostDevice)) -}}
{{- fail "keyward: masterKey.provider tpm with a device: TCTI needs the TPM device in the pod: masterKey.tpm.deviceResource (a device plugin's resource) or masterKey.tpm.hostDevice=true" -}}
{{- end -}}
{{- if and $mk.tpm.hostDevice (not (hasPrefix "device:" $mk.tpm.tcti)) -}}
{{- fail "keyward: masterKey.tpm.hostDevice mounts the device named by a device: TCTI (masterKey.tpm.tcti, e.g. device:/dev/tpmrm0)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The pod's ServiceAccount: serviceAccountName, or with azure-key-vault and
createServiceAccount the one the chart makes (default: the release's full name).
*/}}
{{- define "keyward.serviceAccountName" -}}
{{- $mk := .Values.masterKey -}}
{{- if and (eq $mk.provider "azure-key-vault") $mk.azure.workloadIdentity.createServiceAccount -}}
{{- default (include "keyward.fullname" .) .Values.serviceAccountName -}}
{{- else -}}
{{- .Values.serviceAccountName -}}
{{- end -}}
{{- end -}}

{{/* Where provider secrets (Vault token, AppRole secret id, Vault CA, PKCS#11 PIN) are mounted. */}}
{{- define "keyward.providerDir" -}}/etc/keyward/provider{{- end -}}

{{/* Whether the provider needs the provider-secrets volume. */}}
{{- define "keyward.providerFiles" -}}
{{- $mk := .Values.masterKey -}}
{{- if or (and (eq $mk.provider "vault") (or $mk.vault.tokenSecret.name $mk.vault.secretIdSecret.name $mk.vault.caSecret.name)) (eq $mk.provider "pkcs11") -}}true{{- end -}}
{{- end -}}
